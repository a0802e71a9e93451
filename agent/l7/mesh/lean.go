package mesh

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/textproto"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/proxy"
)

// The lean path (docs/l7.md, "How the agent does it"): an HTTP/1.1 request
// that l7.ServeHTTP1 read itself is forwarded from the same goroutine, on
// upstream connections of its client connection (leanPool), with
// net/http's writer and parser (Request.Write, http.ReadResponse) and the
// header rules of net/http's ReverseProxy as the agent configures it:
// hop-by-hop headers removed both ways, "Te: trailers" kept, Forwarded
// dropped, the client's X-Forwarded-* kept, no User-Agent added,
// unparsable query parameters removed. Everything else (routing,
// authorization, retries, metrics, tracing) is the same code as on
// net/http's server.

const (
	// leanMaxIdle bounds the idle upstream connections kept per client
	// connection.
	leanMaxIdle = 16
	// leanIdleTimeout closes an upstream connection idle this long
	// instead of reusing it (http.Transport's IdleConnTimeout as the
	// agent sets it), well before a destination agent's own idle
	// timeout would close it.
	leanIdleTimeout = 90 * time.Second
	// leanMax1xx bounds the informational responses skipped before the
	// final one, as http.Transport does.
	leanMax1xx = 5
)

// leanKey names the upstream connections a request may reuse: one
// endpoint, dialled for one Service (egress policy is per Service).
type leanKey struct {
	service string
	addr    netip.AddrPort
}

// leanPool is the upstream connections of one client connection on the
// lean path. It is used only by that connection's goroutine: no locks.
type leanPool struct {
	dial func(ctx context.Context, service string, ep proxy.Endpoint) (net.Conn, error)
	idle []*leanUp
	// cur is the connection whose response body is being read.
	cur *leanUp
	// client receives the informational (1xx) responses of the request
	// in flight.
	client *l7.LeanWriter
	// pendingFn is p.pending, made once (a method value allocates).
	pendingFn func() int
}

// leanUp is one upstream connection.
type leanUp struct {
	key       leanKey
	conn      net.Conn
	cr        countingReader
	br        *bufio.Reader
	bw        *bufio.Writer
	idleSince time.Time
	used      bool // it carried a whole exchange before
	deadline  bool // a deadline is set on conn
	// The peek of open, set up once per connection: the socket under
	// conn, the callback and its result.
	peekHow  peekHow
	peekRC   syscall.RawConn
	peekFn   func(fd uintptr) bool
	peekOpen bool
}

// peekHow is how open looks at an idle connection.
type peekHow uint8

const (
	peekUnknown peekHow = iota // not set up yet
	peekSocket                 // a non-blocking peek at the socket
	peekNone                   // no socket under it (a tunnel stream)
	peekBroken                 // its socket cannot be reached: not open
)

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func newLeanPool(dial func(ctx context.Context, service string, ep proxy.Endpoint) (net.Conn, error)) *leanPool {
	p := &leanPool{dial: dial}
	p.pendingFn = p.pending
	return p
}

// pending is how many bytes of the current response the upstream
// connection's reader holds (l7.LeanWriter.WriteResponse flushes the
// client's buffer before reading past them).
func (p *leanPool) pending() int {
	if p.cur == nil {
		return 0
	}
	return p.cur.br.Buffered()
}

// take returns an idle connection for key, closing the ones idle too long.
func (p *leanPool) take(key leanKey, now time.Time) *leanUp {
	for i := len(p.idle) - 1; i >= 0; i-- {
		u := p.idle[i]
		if u.key != key {
			continue
		}
		p.idle = append(p.idle[:i], p.idle[i+1:]...)
		if now.Sub(u.idleSince) > leanIdleTimeout {
			u.close()
			continue
		}
		return u
	}
	return nil
}

func (p *leanPool) put(u *leanUp) {
	if u.deadline {
		_ = u.conn.SetDeadline(time.Time{})
		u.deadline = false
	}
	u.idleSince = time.Now()
	if len(p.idle) >= leanMaxIdle {
		p.idle[0].close()
		p.idle = append(p.idle[:0], p.idle[1:]...)
	}
	p.idle = append(p.idle, u)
}

// close closes every connection of the pool.
func (p *leanPool) close() {
	for _, u := range p.idle {
		u.close()
	}
	p.idle = nil
	if p.cur != nil {
		p.cur.close()
		p.cur = nil
	}
}

func (u *leanUp) close() { _ = u.conn.Close() }

// idempotent reports whether req may be sent again after a reused
// connection failed without answering (http.Transport's rule: a method
// that is idempotent, or an idempotency key).
func idempotent(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, k1 := req.Header["Idempotency-Key"]
	_, k2 := req.Header["X-Idempotency-Key"]
	return k1 || k2
}

// roundTrip sends req (prepared by leanRequest) to ep on a
// connection of the pool, dialled if there is none, and returns the
// response, whose body must be closed before the next roundTrip. A reused
// connection that fails before any byte of a response arrives (the
// upstream closed it while idle) is replaced once, for a request that may
// be sent again; any other request gets a reused connection only if it
// is seen to be still open. The request's context deadline bounds the
// exchange, body included.
func (p *leanPool) roundTrip(req *http.Request, service string, ep proxy.Endpoint) (*http.Response, error) {
	ctx := req.Context()
	key := leanKey{service: service, addr: ep.Addr}
	// A body is read as it is sent: a request with one is never sent
	// twice (it gets a reused connection only if that looks open).
	again := idempotent(req) && (req.Body == nil || req.Body == http.NoBody)
	for try := 0; ; try++ {
		u := p.take(key, time.Now())
		if u != nil && !again && !u.open() {
			u.close()
			u = nil
		}
		if u == nil {
			c, err := p.dial(ctx, service, ep)
			if err != nil {
				return nil, err
			}
			u = &leanUp{key: key, conn: c}
			// An application socket (at the destination agent) is read
			// and written with raw system calls (l7.RawIO); a tunnel
			// stream and a counted plaintext upstream stay as they are.
			rw := l7.RawIO(c)
			u.cr.r = rw
			u.br = bufio.NewReaderSize(&u.cr, 4096)
			u.bw = bufio.NewWriterSize(writerOnly{rw}, 4096)
		}
		read := u.cr.n
		resp, err := u.exchange(ctx, req, p.client)
		if err == nil {
			p.cur = u
			b := &leanBody{p: p, u: u, rc: resp.Body, closeAfter: resp.Close}
			b.eof = resp.Body == http.NoBody
			resp.Body = b
			return resp, nil
		}
		u.close()
		if u.used && again && try == 0 && u.cr.n == read && ctx.Err() == nil {
			continue
		}
		return nil, err
	}
}

var errUnexpected101 = errors.New("the upstream switched protocols for a request that did not ask to")

// exchange writes req and reads the response's header; informational
// (1xx) responses before it go to client.
func (u *leanUp) exchange(ctx context.Context, req *http.Request, client *l7.LeanWriter) (*http.Response, error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = u.conn.SetDeadline(dl)
		u.deadline = true
	} else if u.deadline {
		_ = u.conn.SetDeadline(time.Time{})
		u.deadline = false
	}
	if err := req.Write(u.bw); err != nil {
		return nil, leanError(ctx, err)
	}
	if err := u.bw.Flush(); err != nil {
		return nil, leanError(ctx, err)
	}
	for n := 0; ; n++ {
		resp, err := http.ReadResponse(u.br, req)
		if err != nil {
			return nil, leanError(ctx, err)
		}
		switch {
		case resp.StatusCode == http.StatusSwitchingProtocols:
			return nil, errUnexpected101
		case resp.StatusCode >= 200:
			return resp, nil
		case n >= leanMax1xx:
			return nil, fmt.Errorf("the upstream sent more than %d informational responses", leanMax1xx)
		case client != nil:
			removeHopHeaders(resp.Header)
			if err := client.WriteInformational(resp); err != nil {
				return nil, fmt.Errorf("passing on an informational response: %w", err)
			}
		}
	}
}

// leanError turns a deadline that passed on the connection (set from the
// context's) into the context's error, as http.Transport reports it.
func leanError(ctx context.Context, err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return context.DeadlineExceeded
	}
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return err
}

// open reports whether an idle connection still looks usable: nothing
// unsolicited arrived on it and, for a socket, the peer has not closed it
// (a non-blocking peek). A connection that cannot be looked at (a tunnel
// stream) counts as open only if it was idle under a second.
func (u *leanUp) open() bool {
	if u.br.Buffered() > 0 {
		return false
	}
	if u.peekHow == peekUnknown {
		u.peekHow = peekNone
		c := u.conn
		for {
			nc, ok := c.(interface{ NetConn() net.Conn })
			if !ok {
				break
			}
			c = nc.NetConn()
		}
		if sc, ok := c.(syscall.Conn); ok {
			u.peekHow = peekBroken
			if rc, err := sc.SyscallConn(); err == nil {
				u.peekHow, u.peekRC, u.peekFn = peekSocket, rc, u.peek
			}
		}
	}
	switch u.peekHow {
	case peekNone:
		return time.Since(u.idleSince) < time.Second
	case peekBroken:
		return false
	}
	u.peekOpen = false
	err := u.peekRC.Read(u.peekFn)
	return err == nil && u.peekOpen
}

// peek is open's callback on the socket: whether a one-byte peek finds
// nothing to read (EAGAIN), neither data nor the peer's FIN or reset.
func (u *leanUp) peek(fd uintptr) bool {
	// A raw system call, as the lean path's other socket calls
	// (l7.RawIO): it cannot wait (MSG_DONTWAIT), and syscall.Syscall
	// would wake the runtime's monitor thread at every request.
	var b [1]byte
	_, _, e := syscall.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1, unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
	u.peekOpen = e == unix.EAGAIN
	return true
}

// leanBody is an upstream response's body: closed after it was read to
// its end, it gives the connection back to the pool; closed before, it
// closes the connection (what is left is not read).
type leanBody struct {
	p          *leanPool
	u          *leanUp
	rc         io.ReadCloser
	eof        bool
	closeAfter bool // the upstream said Connection: close
	done       bool
}

var errBodyClosed = errors.New("read on a closed response body")

func (b *leanBody) Read(p []byte) (int, error) {
	if b.done {
		return 0, errBodyClosed
	}
	n, err := b.rc.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *leanBody) Close() error {
	if b.done {
		return nil
	}
	b.done = true
	if b.p.cur == b.u {
		b.p.cur = nil
	}
	if !b.eof || b.closeAfter {
		b.u.close()
		return nil
	}
	_ = b.rc.Close() // at its end: nothing to read
	b.u.used = true
	b.p.put(b.u)
	return nil
}

type writerOnly struct{ io.Writer }

// hopHeaders are removed from requests and responses that are forwarded,
// with the headers the Connection header names (RFC 9110 section 7.6.1),
// as net/http's ReverseProxy removes them.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

func removeHopHeaders(h http.Header) {
	for _, f := range h["Connection"] {
		for sf := range strings.SplitSeq(f, ",") {
			if sf = textproto.TrimString(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
	for _, f := range hopHeaders {
		delete(h, f)
	}
}

// leanRequest prepares r, a request read on the lean path, to be
// forwarded, in place: the header rules of the agent's ReverseProxy (see
// above). r.URL.Host is left to the caller.
func leanRequest(r *http.Request) {
	h := r.Header
	trailers := httpguts.HeaderValuesContainsToken(h["Te"], "trailers")
	removeHopHeaders(h)
	if trailers {
		h["Te"] = []string{"trailers"}
	}
	delete(h, "Forwarded")
	if _, ok := h["User-Agent"]; !ok {
		h["User-Agent"] = []string{""} // Request.Write adds none then
	}
	r.Close = false
	r.RequestURI = ""
	r.URL.Scheme = "http"
	r.URL.RawQuery = cleanQuery(r.URL.RawQuery)
}

// cleanQuery returns q re-encoded without its unparsable parameters when
// it has any (a ';' separator, a malformed escape) or more than
// url.ParseQuery accepts, as ReverseProxy does, so that the application
// and the agent cannot read different parameters; else q itself.
func cleanQuery(q string) string {
	reencode := strings.Count(q, "&")+1 > 10000
	for i := 0; !reencode && i < len(q); i++ {
		switch q[i] {
		case ';':
			reencode = true
		case '%':
			if i+2 >= len(q) || !ishex(q[i+1]) || !ishex(q[i+2]) {
				reencode = true
			}
			i += 2
		}
	}
	if !reencode {
		return q
	}
	v, _ := url.ParseQuery(q)
	return v.Encode()
}

func ishex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// forwardLean forwards r (read on the lean path) with roundTrip and writes
// the response to the client through lw, recording it in rw; a request
// that gets no response is answered by proxyError, as on net/http's
// server.
func (l *Layer) forwardLean(rw *recorder, lw *l7.LeanWriter, r *http.Request, pool *leanPool,
	roundTrip func(*http.Request) (*http.Response, error)) {
	leanRequest(r)
	pool.client = lw
	resp, err := roundTrip(r)
	pool.client = nil
	if err != nil {
		l.proxyError(rw, r, err)
		return
	}
	removeHopHeaders(resp.Header)
	_ = modifyResponse(resp)
	n, err := lw.WriteResponse(resp, pool.pendingFn)
	rw.status, rw.wrote, rw.bytes = resp.StatusCode, true, n
	if err != nil {
		l.log.Debug("response not sent in full", "error", err)
	}
}
