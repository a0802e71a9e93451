package l7

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// maxHeaderRead bounds what is read of a request's header on the lean
// path: the limit net/http's server applies with the default
// MaxHeaderBytes, which ServeConn uses (1 MiB, plus the 4 KiB of slack the
// server allows). A header that does not fit goes to ServeConn, which
// answers 431 as it always did.
const maxHeaderRead = http.DefaultMaxHeaderBytes + 4096

// ReadHeaderTimeout bounds the wait for a request's header once its first
// byte has arrived, on both paths.
const ReadHeaderTimeout = 30 * time.Second

// MaxLeanBody is the largest request body (with a Content-Length) served
// on the lean path; a larger or chunked one goes to net/http's server.
const MaxLeanBody = 64 << 10

// maxLocalBody bounds the body of a response the handler writes itself on
// the lean path (the agent's own answers: 403, 404, 503 texts).
const maxLocalBody = 64 << 10

// ServeHTTP1 serves an HTTP/1.x connection as ServeConn does, but without
// net/http's server for the requests that need nothing more than one
// request and one response at a time: in this goroutine, it reads each
// request with net/http's parser (http.ReadRequest), calls h with a
// *LeanWriter, and writes the answer with net/http's writer. There is no
// per-connection or per-request goroutine, and no background read. A
// handler that forwards the request writes the upstream's response with
// LeanWriter.WriteResponse.
//
// A request is served this way when it is HTTP/1.1, carries no body or
// one of at most MaxLeanBody bytes with a Content-Length, is not HEAD or
// CONNECT, asks for no upgrade and sends no Expect, and passes
// the checks net/http's server makes after parsing (one valid Host, valid
// header names and values). The first request that is anything else, or
// that net/http cannot parse, and every request after it on the
// connection, is served by ServeConn, with the bytes of that request
// replayed: net/http's server answers it exactly as it would have
// (including its 400 and 431 answers to bad requests).
//
// One difference from ServeConn: a lean request is not cancelled when the
// client closes its connection while the handler runs (net/http's server
// notices that with a background read, which costs a goroutine switch per
// request); the handler's timeouts still bound it, and the answer's write
// fails.
func ServeHTTP1(ctx context.Context, c net.Conn, h http.Handler, idle time.Duration) {
	// The client's socket is read and written with raw system calls
	// (RawIO), here and by ServeConn after a fallback.
	c = RawIO(c)
	lc := newLeanConn(c, idle)
	stop := context.AfterFunc(ctx, func() { c.Close() })
	rest := lc.serve(ctx, h)
	lc.release()
	if !stop() || rest == nil {
		c.Close()
		return
	}
	ServeConn(ctx, rest, HTTP1, h, idle)
}

// leanConn is one client connection on the lean path.
type leanConn struct {
	c    net.Conn
	tap  tapReader
	br   *bufio.Reader
	bw   *bufio.Writer
	idle time.Duration
	// afterPOST: the last request was a POST (net/http's server then
	// skips a stray CR LF that old clients send after the body).
	afterPOST bool
	// served counts the requests served.
	served int
	// body holds a request body that arrived with its header (inMemory),
	// bodyReader reads it, and bodyRC is bodyReader as the request's Body.
	body       []byte
	bodyReader bytes.Reader
	bodyRC     io.ReadCloser
	// w and sb are the writer and response body of the request being
	// served, kept here so that a request allocates neither (the
	// connection serves one request at a time, and neither is used after
	// the handler returns: http.ResponseWriter's contract).
	w  LeanWriter
	sb streamBody
}

var (
	leanReaders sync.Pool // *bufio.Reader, 4 KiB as net/http's server
	leanWriters sync.Pool // *bufio.Writer, 4 KiB
)

func newLeanConn(c net.Conn, idle time.Duration) *leanConn {
	lc := &leanConn{c: c, idle: idle}
	lc.tap.r = c
	if br, ok := leanReaders.Get().(*bufio.Reader); ok {
		br.Reset(&lc.tap)
		lc.br = br
	} else {
		lc.br = bufio.NewReaderSize(&lc.tap, 4096)
	}
	// writerOnly hides the connection's ReadFrom, so that a response body
	// is copied through this buffer, never through a 32 KiB buffer of
	// the connection's own.
	if bw, ok := leanWriters.Get().(*bufio.Writer); ok {
		bw.Reset(writerOnly{c})
		lc.bw = bw
	} else {
		lc.bw = bufio.NewWriterSize(writerOnly{c}, 4096)
	}
	return lc
}

// release gives the buffers back (the connection is no longer read or
// written through them).
func (lc *leanConn) release() {
	lc.br.Reset(nil)
	leanReaders.Put(lc.br)
	lc.bw.Reset(nil)
	leanWriters.Put(lc.bw)
	lc.br, lc.bw = nil, nil
	if cap(lc.tap.buf) > 64<<10 {
		lc.tap.buf = nil
	}
}

type writerOnly struct{ io.Writer }

// tapReader is the connection as the request parser reads it. While on, it
// keeps a copy of what it read, so that a request the lean path does not
// serve can be replayed to ServeConn, and it bounds the read as net/http's
// server bounds a header.
type tapReader struct {
	r       io.Reader
	on      bool
	buf     []byte
	left    int
	err     error // the connection's read error while on
	limited bool  // the bound was reached
}

var errHeaderTooLarge = errors.New("request header too large")

func (t *tapReader) Read(p []byte) (int, error) {
	if !t.on {
		return t.r.Read(p)
	}
	if t.left <= 0 {
		t.limited = true
		return 0, errHeaderTooLarge
	}
	if len(p) > t.left {
		p = p[:t.left]
	}
	n, err := t.r.Read(p)
	t.left -= n
	t.buf = append(t.buf, p[:n]...)
	if err != nil {
		t.err = err
	}
	return n, err
}

// serve serves requests until the connection is over (nil) or a request
// needs net/http's server: then it returns the connection with that
// request's bytes put back.
func (lc *leanConn) serve(ctx context.Context, h http.Handler) (rest net.Conn) {
	defer func() {
		// As net/http's server does, a handler's panic ends its
		// connection, not the agent.
		if v := recover(); v != nil {
			rest = nil
		}
	}()
	for {
		req, replay, over := lc.next()
		if over {
			return nil
		}
		if req == nil {
			return Replay(lc.c, replay)
		}
		lc.inMemory(req)
		w := &lc.w
		*w = LeanWriter{lc: lc, req: req, close: req.Close, body: w.body[:0]}
		lc.afterPOST = req.Method == http.MethodPost
		lc.served++
		h.ServeHTTP(w, req.WithContext(ctx))
		if err := w.finish(); err != nil || w.close {
			return nil
		}
		// What the handler left of the body (at most MaxLeanBody) is
		// read and dropped, as net/http's server does, so that the next
		// request starts where it should.
		if err := req.Body.Close(); err != nil {
			return nil
		}
	}
}

// inMemory gives req a body in memory when all of it arrived with the
// header (the common small request: the client wrote both at once), so
// that the request is forwarded in one write: Request.Write flushes the
// header on its own before a body that is not a known in-memory reader,
// which would cost a second HBONE DATA frame, TLS record and write(2) at
// the source agent, and a second write(2) to the application at the
// destination. The bytes are copied out of the connection's reader; a body
// that is not all there yet is streamed as before.
func (lc *leanConn) inMemory(req *http.Request) {
	n := req.ContentLength
	if n <= 0 || int64(lc.br.Buffered()) < n {
		return
	}
	if int64(cap(lc.body)) < n {
		lc.body = make([]byte, n)
	}
	b := lc.body[:n]
	if _, err := io.ReadFull(req.Body, b); err != nil {
		return // cannot happen: the bytes are buffered
	}
	_ = req.Body.Close() // at its end: nothing is read
	lc.bodyReader.Reset(b)
	if lc.bodyRC == nil {
		// io.NopCloser of a *bytes.Reader: net/http knows it is in memory.
		lc.bodyRC = io.NopCloser(&lc.bodyReader)
	}
	req.Body = lc.bodyRC
}

// next reads the next request. It returns a request to serve here; or
// replay, the bytes of a request for ServeConn (everything read since the
// request began); or over when the connection closed, failed or timed out.
func (lc *leanConn) next() (req *http.Request, replay []byte, over bool) {
	t := &lc.tap
	t.buf, t.err, t.limited, t.left = t.buf[:0], nil, false, maxHeaderRead
	if n := lc.br.Buffered(); n > 0 {
		b, _ := lc.br.Peek(n)
		t.buf = append(t.buf, b...) // a pipelined request, read already
	}
	t.on = true
	defer func() { t.on = false }()
	if lc.served > 0 {
		// Between requests, as net/http's server: the idle timeout, and
		// a connection that ends before 4 more bytes is closed quietly.
		if lc.br.Buffered() < 4 {
			var dl time.Time
			if lc.idle > 0 {
				dl = time.Now().Add(lc.idle)
			}
			_ = lc.c.SetReadDeadline(dl)
		}
		if _, err := lc.br.Peek(4); err != nil {
			return nil, nil, true // closed, failed, or idle too long
		}
	}
	_ = lc.c.SetReadDeadline(time.Now().Add(ReadHeaderTimeout))
	if lc.afterPOST {
		n := 0
		for {
			b, err := lc.br.Peek(n + 1)
			if err != nil || (b[n] != '\r' && b[n] != '\n') {
				break
			}
			n++
		}
		_, _ = lc.br.Discard(n)
		t.buf = t.buf[n:]
	}
	req, err := http.ReadRequest(lc.br)
	if err != nil {
		if !t.limited && t.err != nil && t.err != io.EOF {
			return nil, nil, true // the connection failed or timed out mid-header
		}
		return nil, t.buf, false // net/http's server gives the answer
	}
	if !leanRequest(req) {
		return nil, t.buf, false
	}
	return req, nil, false
}

// leanRequest reports whether req can be served on the lean path: see
// ServeHTTP1. The header checks are the ones net/http's server makes after
// parsing; a request that fails them goes to the server, which refuses it.
// http.ReadRequest has moved the Host header to req.Host (it refused a
// repeated one): with a request target in origin form ("/path"), a
// non-empty req.Host is the one Host header the server requires.
func leanRequest(req *http.Request) bool {
	if req.ProtoMajor != 1 || req.ProtoMinor != 1 {
		return false
	}
	if req.Body != http.NoBody && (len(req.TransferEncoding) > 0 || req.ContentLength <= 0 || req.ContentLength > MaxLeanBody) {
		return false
	}
	switch req.Method {
	case http.MethodHead, http.MethodConnect:
		return false
	}
	if !strings.HasPrefix(req.RequestURI, "/") || req.Host == "" || !httpguts.ValidHostHeader(req.Host) {
		return false
	}
	h := req.Header
	if _, ok := h["Upgrade"]; ok {
		return false
	}
	if _, ok := h["Expect"]; ok {
		return false
	}
	for k, vv := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return false
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return false
			}
		}
	}
	return true
}

// LeanWriter is the http.ResponseWriter of a request on the lean path
// (ServeHTTP1). What a handler writes through it (the agent's own
// answers) is buffered, at most 64 KiB, and sent with its length when the
// handler returns. A handler that forwards the request sends the
// upstream's response with WriteResponse instead.
type LeanWriter struct {
	lc     *leanConn
	req    *http.Request
	header http.Header
	status int
	body   []byte
	sent   bool // WriteResponse was called
	err    error
	// close: the connection ends after this response (the client asked,
	// or a response failed half-way).
	close bool
}

var _ http.ResponseWriter = (*LeanWriter)(nil)

// Header is the response's header.
func (w *LeanWriter) Header() http.Header {
	if w.header == nil {
		w.header = make(http.Header)
	}
	return w.header
}

// WriteHeader sets the status; 1xx statuses are not sent.
func (w *LeanWriter) WriteHeader(code int) {
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if w.status == 0 && code >= 200 {
		w.status = code
	}
}

var errLocalBody = errors.New("l7: the agent's own response body is over 64 KiB")

// Write appends to the response's body.
func (w *LeanWriter) Write(p []byte) (int, error) {
	if w.sent {
		return 0, http.ErrBodyNotAllowed
	}
	if w.status == 0 {
		w.status = http.StatusOK
	}
	if len(w.body)+len(p) > maxLocalBody {
		return 0, errLocalBody
	}
	w.body = append(w.body, p...)
	return len(p), nil
}

// finish sends what the handler wrote, unless it sent a response with
// WriteResponse.
func (w *LeanWriter) finish() error {
	if w.sent {
		return w.err
	}
	status := w.status
	if status == 0 {
		status = http.StatusOK
	}
	resp := &http.Response{StatusCode: status, ProtoMajor: 1, ProtoMinor: 1, Header: w.Header(),
		ContentLength: int64(len(w.body)), Body: http.NoBody, Request: w.req, Close: w.close}
	if len(w.body) > 0 {
		resp.Body = io.NopCloser(bytes.NewReader(w.body))
	}
	addDate(resp.Header)
	err := resp.Write(w.lc.bw)
	if err == nil {
		err = w.lc.bw.Flush()
	}
	return err
}

// WriteResponse sends resp, an upstream's response to this request (from
// http.ReadResponse), to the client with net/http's writer (Response.Write)
// and closes its body. Hop-by-hop headers must already be removed. The
// body is streamed: what is buffered for the client is flushed whenever
// the next read of the body would wait for the upstream, which
// upstreamBuffered tells (the bytes the upstream's reader holds; nil:
// always flush before reading). A body of unknown length is sent chunked,
// so the connection stays open. It returns the body bytes sent; after an
// error the connection is closed (the client may have a partial response).
// The response's header becomes this writer's Header.
func (w *LeanWriter) WriteResponse(resp *http.Response, upstreamBuffered func() int) (int64, error) {
	body := &w.lc.sb
	*body = streamBody{r: resp.Body, bw: w.lc.bw, buffered: upstreamBuffered}
	defer body.Close()
	w.sent = true
	w.header = resp.Header
	w.status = resp.StatusCode
	resp.Proto, resp.ProtoMajor, resp.ProtoMinor = "HTTP/1.1", 1, 1
	resp.Status = "" // the standard reason phrase, as net/http's server writes
	resp.Close = w.close
	resp.Request = w.req
	if resp.ContentLength < 0 && !isChunked(resp.TransferEncoding) {
		resp.TransferEncoding = []string{"chunked"}
	}
	addDate(resp.Header)
	resp.Body = body
	if resp.ContentLength == 0 {
		// Nothing to read (and Response.Write would probe the body
		// with a read, flushing the header on its own).
		resp.Body = http.NoBody
	}
	err := resp.Write(w.lc.bw)
	if err == nil {
		err = w.lc.bw.Flush()
	}
	if err != nil {
		w.err, w.close = err, true
	}
	return body.n, err
}

// WriteInformational sends an upstream's informational response (1xx,
// such as 103 Early Hints) to the client at once, as net/http's
// ReverseProxy passes them on.
func (w *LeanWriter) WriteInformational(resp *http.Response) error {
	info := &http.Response{StatusCode: resp.StatusCode, ProtoMajor: 1, ProtoMinor: 1,
		Header: resp.Header, Body: http.NoBody, Request: w.req}
	err := info.Write(w.lc.bw)
	if err == nil {
		err = w.lc.bw.Flush()
	}
	return err
}

func isChunked(te []string) bool { return len(te) > 0 && te[0] == "chunked" }

// addDate adds a Date header if there is none, as net/http's server does.
func addDate(h http.Header) {
	if _, ok := h["Date"]; !ok {
		h["Date"] = []string{httpDate(time.Now())}
	}
}

// httpDate is now in http.TimeFormat. The text changes once a second, so
// it is formatted once a second, not once a response.
func httpDate(now time.Time) string {
	sec := now.Unix()
	if d := lastDate.Load(); d != nil && d.sec == sec {
		return d.text
	}
	d := &formattedDate{sec: sec, text: now.UTC().Format(http.TimeFormat)}
	lastDate.Store(d)
	return d.text
}

type formattedDate struct {
	sec  int64
	text string
}

var lastDate atomic.Pointer[formattedDate]

// streamBody is a response body on its way to the client: it counts the
// bytes, and flushes the client's buffer before a read that would wait.
type streamBody struct {
	r        io.ReadCloser
	bw       *bufio.Writer
	buffered func() int
	n        int64
	closed   bool
}

func (b *streamBody) Read(p []byte) (int, error) {
	if b.bw.Buffered() > 0 && (b.buffered == nil || b.buffered() == 0) {
		// p may be the free part of bw's own buffer: net/http's writer
		// copies a body with a length through bw.ReadFrom, which reads
		// into bw's buffer behind what it holds. After the flush that
		// space is no longer behind what bw holds, and bytes read into
		// it would be lost; so nothing is read, and ReadFrom asks again
		// with the space that is free now (it allows empty reads).
		inBuffer := sameStart(p, b.bw.AvailableBuffer())
		if err := b.bw.Flush(); err != nil {
			return 0, err
		}
		if inBuffer {
			return 0, nil
		}
	}
	n, err := b.r.Read(p)
	b.n += int64(n)
	return n, err
}

// sameStart reports whether p and the capacity of q begin at the same byte.
func sameStart(p, q []byte) bool {
	return len(p) > 0 && cap(q) > 0 && &p[0] == &q[:1][0]
}

// WriteTo copies through a pooled buffer: io.Copy would allocate 32 KiB
// per response (net/http copies a chunked body that way).
func (b *streamBody) WriteTo(w io.Writer) (int64, error) {
	bp, ok := copyBuffers.Get().(*[]byte)
	if !ok {
		buf := make([]byte, 32<<10)
		bp = &buf
	}
	defer copyBuffers.Put(bp)
	return io.CopyBuffer(w, (*readOnlyBody)(b), *bp)
}

// readOnlyBody is a streamBody without WriteTo (io.CopyBuffer would call
// it), as a pointer, which an interface holds without an allocation.
type readOnlyBody streamBody

func (b *readOnlyBody) Read(p []byte) (int, error) { return (*streamBody)(b).Read(p) }

func (b *streamBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	return b.r.Close()
}

var copyBuffers sync.Pool // *[]byte, 32 KiB
