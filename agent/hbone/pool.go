package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// Key identifies a pooled connection. Streams share a connection only when
// all three match: the TLS session authenticates exactly one source and one
// destination workload (as Istio requires), and it terminates at one pod.
type Key struct {
	Src  spiffeid.ID    // identity presented by the client (the source workload)
	Dst  spiffeid.ID    // identity required of the server (the destination workload)
	Addr netip.AddrPort // the destination pod's HBONE address, normally podIP:15008
	// SrcNetns is opaque to the pool: where the connection is dialled
	// from. The agent sets the source pod's network namespace, so that the
	// tunnel leaves from the pod's own IP, and pods never share a
	// connection even when they share an identity (as in ztunnel's in-pod
	// mode).
	SrcNetns string
}

func (k Key) String() string {
	if k.SrcNetns == "" {
		return fmt.Sprintf("%s->%s@%s", k.Src, k.Dst, k.Addr)
	}
	return fmt.Sprintf("%s->%s@%s via %s", k.Src, k.Dst, k.Addr, k.SrcNetns)
}

// DialFunc dials the TCP connection under a tunnel; KeyFromContext(ctx)
// tells it which key the connection is for (e.g. the namespace to dial
// from). The agent's dialer also marks its sockets so that capture does not
// redirect them again.
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

type keyCtx struct{}

// KeyFromContext returns the key a DialFunc call is for.
func KeyFromContext(ctx context.Context) (Key, bool) {
	k, ok := ctx.Value(keyCtx{}).(Key)
	return k, ok
}

// DefaultScaleOutStreams is the number of streams that makes a pooled
// connection busy (see PoolConfig.ScaleOutStreams).
const DefaultScaleOutStreams = 16

// PoolConfig configures a Pool.
type PoolConfig struct {
	TLS    ClientTLS // required
	Dial   DialFunc  // nil: a net.Dialer
	Logger *slog.Logger
	// MaxStreamsPerConn caps the streams on one connection (default
	// DefaultMaxStreams); the server's SETTINGS can lower it further.
	MaxStreamsPerConn int
	// ScaleOutStreams makes a connection "busy" when it carries this many
	// streams (default DefaultScaleOutStreams; negative: never). A stream
	// that finds every connection of its key busy still goes on the least
	// loaded one, and the pool opens one more connection to the peer in
	// the background, up to MaxScaleOutConns, so that busy streams are
	// spread over several connections, each with its own reader on both
	// ends, instead of queueing behind one.
	ScaleOutStreams int
	// MaxScaleOutConns caps the connections per key that scale-out opens
	// (default: the number of CPUs, at least 2; not GOMAXPROCS, which
	// agent/procs lowers at light load). MaxStreamsPerConn still opens
	// more when every connection is full.
	MaxScaleOutConns int
	// IdleTimeout closes a connection that has carried no stream for this
	// long (default 2 minutes).
	IdleTimeout time.Duration
	// ConnectTimeout bounds TCP connect plus TLS handshake (default 5 s),
	// so that a dead peer turns into an error quickly, not a hang.
	ConnectTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for the answer to a CONNECT
	// (default 15 s: the peer dials the application before it answers).
	ResponseHeaderTimeout time.Duration
	// PingInterval sends an HTTP/2 PING after this long without frames, and
	// closes the connection if no answer comes within PingTimeout; it finds
	// dead peers under idle streams (defaults 30 s and 15 s).
	PingInterval, PingTimeout time.Duration
	Flow                      FlowControl
}

// ErrPoolClosed is returned by Connect after Close.
var ErrPoolClosed = errors.New("hbone pool is closed")

// ConnectError is returned by Connect when the server answered the CONNECT
// with a status other than 200.
type ConnectError struct {
	Status int
}

func (e *ConnectError) Error() string {
	return fmt.Sprintf("HBONE CONNECT refused by peer: %d %s", e.Status, http.StatusText(e.Status))
}

var errResponseTimeout = errors.New("no response to HBONE CONNECT in time")

// PoolStats are monotonic counters and gauges for metrics.
type PoolStats struct {
	Hits             uint64 // streams opened on an existing connection
	Misses           uint64 // streams that needed a new connection
	Handshakes       uint64 // successful TLS handshakes
	HandshakeErrors  uint64 // failed dials or handshakes
	ScaleOuts        uint64 // connections opened because every connection of a key was busy
	ResponseTimeouts uint64 // CONNECTs reset because no response came in time
	PingTimeouts     uint64 // connections closed because the peer did not answer a PING
	ExpiredConns     uint64 // connections that stopped taking streams because a certificate of their handshake expired
	Conns            int    // open connections
	Streams          int    // open streams
}

// Pool is the client side of HBONE: a set of HTTP/2 connections to peer
// agents, opened on demand and shared by streams.
//
// At most one handshake per Key is in flight: concurrent Connects to a new
// peer wait for it, and then share the connection. A connection takes at
// most MaxStreamsPerConn streams (and no more than the server allows);
// past that, or after the server's GOAWAY, the next stream opens a new
// connection. Busy connections scale out (see PoolConfig.ScaleOutStreams).
// Idle connections are closed after IdleTimeout. A connection takes no
// new streams once a certificate of its handshake (the peer's or ours)
// has expired; it drains and closes (expiry.go).
type Pool struct {
	cfg  PoolConfig
	log  *slog.Logger
	ccfg *connConfig
	ctr  counters

	mu     sync.Mutex
	keys   map[Key]*keyConns
	closed bool

	ctx    context.Context // cancelled by Close; parent of every dial
	cancel context.CancelFunc
	wg     sync.WaitGroup // janitor, dial and body goroutines

	hits, misses, scaleOuts atomic.Uint64
}

type keyConns struct {
	conns   []*poolConn
	dialing *dialCall // nil when no handshake is in flight
}

type dialCall struct {
	done chan struct{}
	err  error
}

type poolConn struct {
	key       Key
	c         *conn
	streams   int       // guarded by Pool.mu
	idleSince time.Time // guarded by Pool.mu, when streams dropped to 0
}

// NewPool validates cfg and starts the pool's idle janitor. Close stops it.
func NewPool(cfg PoolConfig) (*Pool, error) {
	if cfg.TLS == nil {
		return nil, errors.New("creating HBONE pool: PoolConfig.TLS is required")
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxStreamsPerConn <= 0 {
		cfg.MaxStreamsPerConn = DefaultMaxStreams
	}
	if cfg.ScaleOutStreams == 0 {
		cfg.ScaleOutStreams = DefaultScaleOutStreams
	}
	if cfg.MaxScaleOutConns <= 0 {
		cfg.MaxScaleOutConns = max(2, runtime.NumCPU())
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 2 * time.Minute
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	if cfg.ResponseHeaderTimeout <= 0 {
		cfg.ResponseHeaderTimeout = 15 * time.Second
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = 30 * time.Second
	}
	if cfg.PingTimeout <= 0 {
		cfg.PingTimeout = 15 * time.Second
	}
	fc, err := cfg.Flow.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("creating HBONE pool: %w", err)
	}
	cfg.Flow = fc
	p := &Pool{
		cfg:  cfg,
		log:  cfg.Logger,
		keys: make(map[Key]*keyConns),
	}
	p.ccfg = &connConfig{
		flow:           fc,
		maxStreams:     cfg.MaxStreamsPerConn,
		maxHeaderBytes: DefaultMaxHeaderBytes,
		pingInterval:   cfg.PingInterval,
		pingTimeout:    cfg.PingTimeout,
		prefaceTimeout: 10 * time.Second,
		log:            cfg.Logger,
		ctr:            &p.ctr,
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.wg.Add(1)
	go p.janitor()
	return p, nil
}

// Stats returns the pool's counters.
func (p *Pool) Stats() PoolStats {
	s := PoolStats{
		Hits:             p.hits.Load(),
		Misses:           p.misses.Load(),
		Handshakes:       p.ctr.handshakes.Load(),
		HandshakeErrors:  p.ctr.handshakeErrors.Load(),
		ScaleOuts:        p.scaleOuts.Load(),
		ResponseTimeouts: p.ctr.responseTimeouts.Load(),
		PingTimeouts:     p.ctr.pingTimeouts.Load(),
		ExpiredConns:     p.ctr.certExpired.Load(),
	}
	p.mu.Lock()
	for _, kc := range p.keys {
		s.Conns += len(kc.conns)
		for _, pc := range kc.conns {
			s.Streams += pc.streams
		}
	}
	p.mu.Unlock()
	return s
}

// ConnectRequest describes one tunnelled stream.
type ConnectRequest struct {
	Key    Key
	Target netip.AddrPort // the :authority, the destination pod's IP and the application port
	Header http.Header    // extra request headers (baggage, forwarded, traceparent); may be nil
	// Body, if not nil, is the data to send: a goroutine of the pool reads
	// it until EOF (which half-closes the stream) and then closes it. If
	// nil, the stream's Write and CloseWrite (or Relay) supply the data.
	Body io.ReadCloser
}

// Connect opens a CONNECT stream for r on a pooled connection, dialing and
// handshaking first if no connection to r.Key can take another stream.
// r.Body is always closed, also when Connect fails. A stream the server
// refused unprocessed (REFUSED_STREAM, or beyond its GOAWAY) is retried on
// another connection.
//
// ctx bounds the whole stream, not only its setup: cancelling it resets the
// stream. Close the returned Stream when done.
func (p *Pool) Connect(ctx context.Context, r ConnectRequest) (*Stream, error) {
	closeBody := func() {
		if r.Body != nil {
			r.Body.Close()
		}
	}
	if !r.Target.IsValid() {
		closeBody()
		return nil, errors.New("opening HBONE stream: invalid target address")
	}
	authority := r.Target.String()
	var err error
	for range 3 {
		var pc *poolConn
		if pc, err = p.get(ctx, r.Key); err != nil {
			closeBody()
			return nil, err
		}
		var st *stream
		if st, err = p.open(ctx, pc, authority, r.Header); err != nil {
			p.release(pc)
			if errors.Is(err, errRefused) {
				continue
			}
			break
		}
		s := &Stream{s: st, key: r.Key, release: func() { p.release(pc) }}
		s.stop = context.AfterFunc(ctx, func() {
			st.abort(fmt.Errorf("hbone stream: %w", context.Cause(ctx)), http2.ErrCodeCancel)
		})
		if r.Body != nil {
			s.body = r.Body
			s.bodyDone = make(chan struct{})
			p.wg.Add(1)
			go p.sendBody(st, r.Body, s.bodyDone)
		}
		return s, nil
	}
	closeBody()
	return nil, fmt.Errorf("opening HBONE stream to %s via %s: %w", authority, r.Key.Addr, err)
}

// open sends the CONNECT on pc and waits for the response.
func (p *Pool) open(ctx context.Context, pc *poolConn, authority string, hdr http.Header) (*stream, error) {
	st, ch, err := pc.c.openStream(authority, hdr)
	if err != nil {
		return nil, err
	}
	t := time.NewTimer(p.cfg.ResponseHeaderTimeout)
	defer t.Stop()
	select {
	case <-ch:
	case <-ctx.Done():
		st.abort(ctx.Err(), http2.ErrCodeCancel)
		return nil, ctx.Err()
	case <-t.C:
		p.ctr.responseTimeouts.Add(1)
		p.ctr.logOnce(&p.ctr.loggedTimeout, p.log, "HBONE peer did not answer a CONNECT in time; resetting it (logged once)",
			"dst", pc.key.Addr.String(), "timeout", p.cfg.ResponseHeaderTimeout)
		st.abort(errResponseTimeout, http2.ErrCodeCancel)
		return nil, errResponseTimeout
	}
	st.mu.Lock()
	status, serr := st.status, st.err
	st.mu.Unlock()
	switch {
	case status == 0:
		return nil, serr
	case status != http.StatusOK:
		err := &ConnectError{Status: status}
		st.mu.Lock()
		answered := st.recvEnd
		st.mu.Unlock()
		if answered {
			// The refusal ended the stream: close our side cleanly
			// rather than with a reset.
			_ = st.closeSend()
		}
		st.abort(err, http2.ErrCodeCancel)
		return nil, err
	}
	return st, nil
}

func (p *Pool) sendBody(st *stream, body io.ReadCloser, done chan struct{}) {
	defer p.wg.Done()
	defer close(done)
	defer body.Close()
	bp := relayBufs.Get().(*[]byte)
	defer relayBufs.Put(bp)
	buf := *bp
	for {
		n, err := body.Read(buf[frameHeaderLen:])
		if n > 0 {
			if st.sendFramed(buf[:frameHeaderLen+n]) != nil {
				return
			}
		}
		if err == io.EOF {
			_ = st.closeSend()
			return
		}
		if err != nil {
			st.abort(fmt.Errorf("reading request body: %w", err), http2.ErrCodeCancel)
			return
		}
	}
}

// get returns a connection for key with a stream slot reserved.
func (p *Pool) get(ctx context.Context, key Key) (*poolConn, error) {
	dialed := false // this caller started a handshake: its stream is the miss
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		kc := p.keys[key]
		if kc == nil {
			kc = &keyConns{}
			p.keys[key] = kc
		}
		pc, busy := p.reserveLocked(kc)
		if pc != nil {
			if busy && kc.dialing == nil && len(kc.conns) < p.cfg.MaxScaleOutConns {
				p.scaleOuts.Add(1)
				p.startDialLocked(key, kc)
			}
			p.mu.Unlock()
			if !dialed {
				p.hits.Add(1)
			}
			return pc, nil
		}
		call := kc.dialing
		if call == nil {
			call = p.startDialLocked(key, kc)
			dialed = true
			p.misses.Add(1)
		}
		p.mu.Unlock()
		select {
		case <-call.done:
			if call.err != nil {
				return nil, call.err
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for HBONE connection to %s: %w", key.Addr, ctx.Err())
		}
	}
}

func (p *Pool) startDialLocked(key Key, kc *keyConns) *dialCall {
	call := &dialCall{done: make(chan struct{})}
	kc.dialing = call
	p.wg.Add(1)
	go p.dial(key, kc, call)
	return call
}

// reserveLocked takes a stream slot on a usable connection of kc. Below
// the busy mark it packs streams onto the busiest connection, so that
// surplus connections drain and close; when every connection is busy it
// takes the least loaded one and reports busy. It also forgets closed
// connections.
func (p *Pool) reserveLocked(kc *keyConns) (*poolConn, bool) {
	var pack, least *poolConn
	live := kc.conns[:0]
	soft := p.cfg.ScaleOutStreams
	for _, pc := range kc.conns {
		if pc.c.isClosed() {
			continue
		}
		live = append(live, pc)
		if pc.streams >= p.cfg.MaxStreamsPerConn || !pc.c.canOpen(p.cfg.MaxStreamsPerConn) {
			continue
		}
		if (soft < 0 || pc.streams < soft) && (pack == nil || pc.streams > pack.streams) {
			pack = pc
		}
		if least == nil || pc.streams < least.streams {
			least = pc
		}
	}
	clear(kc.conns[len(live):])
	kc.conns = live
	busy := false
	pick := pack
	if pick == nil {
		pick, busy = least, least != nil
	}
	if pick == nil || !pick.c.reserve(p.cfg.MaxStreamsPerConn) {
		return nil, false
	}
	pick.streams++
	return pick, busy
}

// dial runs in its own goroutine, owned by the pool, so that a caller that
// gives up does not abort a handshake that other callers wait for.
func (p *Pool) dial(key Key, kc *keyConns, call *dialCall) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.ConnectTimeout)
	c, err := p.handshake(ctx, key)
	cancel()
	p.mu.Lock()
	kc.dialing = nil
	if err == nil && p.closed {
		c.fail(ErrPoolClosed)
		err = ErrPoolClosed
	}
	if err != nil {
		p.ctr.handshakeErrors.Add(1)
		call.err = err
	} else {
		p.ctr.handshakes.Add(1)
		kc.conns = append(kc.conns, &poolConn{key: key, c: c, idleSince: time.Now()})
	}
	close(call.done)
	p.mu.Unlock()
	if err == nil || c == nil {
		return
	}
	c.wait()
}

func (p *Pool) handshake(ctx context.Context, key Key) (*conn, error) {
	cfg, err := p.cfg.TLS.ClientTLS(key.Src, key.Dst)
	if err != nil {
		return nil, fmt.Errorf("building TLS config for HBONE %s: %w", key, err)
	}
	cfg = cfg.Clone()
	cfg.DynamicRecordSizingDisabled = true
	var own ownCert
	own.record(cfg)
	raw, err := p.cfg.Dial(context.WithValue(ctx, keyCtx{}, key), "tcp", key.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("dialing HBONE %s (is port %d open on the destination pod, or is a NetworkPolicy blocking it?): %w", key.Addr, key.Addr.Port(), err)
	}
	bc := newBatchConn(raw)
	tc := tls.Client(bc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake for HBONE %s (peer must present SVID %s): %w", key.Addr, key.Dst, err)
	}
	if err := checkConnState(tc.ConnectionState()); err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake for HBONE %s: %w", key.Addr, err)
	}
	expiry := certsExpiry(tc.ConnectionState(), &own)
	if err := expiredAt(expiry); err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake for HBONE %s: %w", key.Addr, err)
	}
	c := newConn(p.ctx, tc, bc, p.ccfg, key.Dst, key.Addr)
	c.log = p.log.With("dst", key.Addr.String())
	if err := c.start(); err != nil {
		c.wait()
		return nil, fmt.Errorf("starting HTTP/2 on HBONE %s: %w", key.Addr, err)
	}
	c.drainAt(expiry, &p.ctr.certExpired)
	p.log.Debug("hbone connection established", "key", key.String())
	return c, nil
}

func (p *Pool) release(pc *poolConn) {
	p.mu.Lock()
	pc.streams--
	if pc.streams == 0 {
		pc.idleSince = time.Now()
	}
	p.mu.Unlock()
}

func (p *Pool) janitor() {
	defer p.wg.Done()
	tick := p.cfg.IdleTimeout / 4
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case now := <-t.C:
			p.closeIdle(now)
		}
	}
}

func (p *Pool) closeIdle(now time.Time) {
	var toClose []*conn
	p.mu.Lock()
	for key, kc := range p.keys {
		live := kc.conns[:0]
		for _, pc := range kc.conns {
			if pc.c.isClosed() {
				continue
			}
			if pc.streams == 0 && now.Sub(pc.idleSince) >= p.cfg.IdleTimeout {
				toClose = append(toClose, pc.c)
				continue
			}
			live = append(live, pc)
		}
		clear(kc.conns[len(live):])
		kc.conns = live
		if len(kc.conns) == 0 && kc.dialing == nil {
			delete(p.keys, key)
		}
	}
	p.mu.Unlock()
	for _, c := range toClose {
		c.goAway(http2.ErrCodeNo, "idle")
		c.fail(errors.New("idle"))
		c.wait()
	}
}

// Close closes every connection (resetting their streams) and stops the
// pool. Connect fails with ErrPoolClosed afterwards.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	var all []*conn
	for _, kc := range p.keys {
		for _, pc := range kc.conns {
			all = append(all, pc.c)
		}
	}
	p.keys = map[Key]*keyConns{}
	p.mu.Unlock()
	p.cancel()
	for _, c := range all {
		c.fail(ErrPoolClosed)
	}
	for _, c := range all {
		c.wait()
	}
	p.wg.Wait()
	return nil
}

// Stream is one CONNECT stream. Read returns the peer's bytes; Write and
// CloseWrite send bytes when ConnectRequest.Body was nil. Relay replaces
// Read, Write and CloseWrite.
type Stream struct {
	s        *stream
	key      Key
	once     sync.Once
	release  func()
	stop     func() bool
	body     io.ReadCloser
	bodyDone chan struct{}
}

// Key returns the pool key of the connection carrying the stream.
func (s *Stream) Key() Key { return s.key }

// Read reads bytes sent by the peer; io.EOF means the peer half-closed.
func (s *Stream) Read(p []byte) (int, error) { return s.s.read(p) }

var errBodySupplied = errors.New("hbone stream: Write used with ConnectRequest.Body set")

// Write sends p to the peer.
func (s *Stream) Write(p []byte) (int, error) {
	if s.body != nil {
		return 0, errBodySupplied
	}
	return s.s.write(p)
}

// CloseWrite half-closes the stream (END_STREAM).
func (s *Stream) CloseWrite() error {
	if s.body != nil {
		return errBodySupplied
	}
	return s.s.closeSend()
}

// Relay copies between app (the application's connection) and the
// stream until both directions are over. The calling goroutine reads app
// in large chunks and writes the DATA frames to the TLS connection
// itself; the connection's read loop writes received DATA to app
// directly when app's socket takes it without blocking, and otherwise
// buffers it (within the flow-control window) for a goroutine that lives
// only until the buffer is drained. app's EOF becomes END_STREAM and the
// peer's END_STREAM becomes CloseWrite on app, in either order (half-close
// both ways); a reset on either side resets the other. sent counts bytes
// read from app, recv bytes delivered to app.
//
// It returns nil when both directions ended cleanly, else the error. It
// does not close app: close it after Relay, with a reset after an error.
// Relay cannot be combined with Body, Read, Write or CloseWrite.
func (s *Stream) Relay(app net.Conn, sent, recv *atomic.Int64) error {
	if s.body != nil {
		return errBodySupplied
	}
	return s.s.relay(app, sent, recv)
}

// Close ends the stream, resetting it if either direction is still open,
// and returns its slot to the pool.
func (s *Stream) Close() error {
	s.once.Do(func() {
		s.stop()
		s.s.abort(errStreamClosed, http2.ErrCodeCancel)
		if s.body != nil {
			s.body.Close()
			<-s.bodyDone
		}
		s.release()
	})
	return nil
}

var errStreamClosed = errors.New("hbone stream closed")

// closeAfterPeer is Close for a stream whose sending side is over
// (StreamConn.Close): it returns the slot now and lets the stream end by
// itself when the peer's END_STREAM arrives, without RST_STREAM. A peer
// that has not ended its side within drainAfterClose is reset.
func (s *Stream) closeAfterPeer() {
	s.once.Do(func() {
		s.stop()
		st := s.s
		if st.recvOpen() {
			time.AfterFunc(drainAfterClose, func() {
				if st.recvOpen() {
					st.abort(errStreamClosed, http2.ErrCodeCancel)
				}
			})
		}
		s.release()
	})
}

// openStream sends a CONNECT for authority on a slot taken with reserve.
// It returns the stream and a channel closed when the response arrived or
// the stream failed.
func (c *conn) openStream(authority string, hdr http.Header) (*stream, chan struct{}, error) {
	s := newStream(c, 0)
	ch := make(chan struct{})
	s.respCh = ch
	if err := c.lockWriter(false); err != nil {
		c.mu.Lock()
		c.reserved--
		c.mu.Unlock()
		return nil, nil, err
	}
	c.mu.Lock()
	c.reserved--
	if c.closed || c.goAwayRecv || c.goAwaySent || c.nextID > 1<<31-1 {
		c.mu.Unlock()
		c.wmu.Unlock()
		return nil, nil, errRefused
	}
	s.id = c.nextID
	c.nextID += 2
	s.sendWin = c.peerInitWin
	c.streams[s.id] = s
	c.mu.Unlock()
	c.maxOpened.Store(s.id)
	fields := make([]string, 0, 4+2*len(hdr))
	fields = append(fields, ":method", http.MethodConnect, ":authority", authority)
	for k, vs := range hdr {
		name := strings.ToLower(k)
		if connectionHeaders[name] || name == "host" || name == "te" || strings.HasPrefix(name, ":") {
			continue
		}
		for _, v := range vs {
			fields = append(fields, name, v)
		}
	}
	if err := c.writeHeadersLocked(s.id, false, fields...); err != nil {
		c.wmu.Unlock()
		s.abortWith(err, http2.ErrCodeCancel, false)
		return nil, nil, err
	}
	if err := c.commitLocked(true); err != nil {
		return nil, nil, err
	}
	return s, ch, nil
}

// canOpen reports whether the connection may take another stream.
func (c *conn) canOpen(limit int) bool {
	_, ok := c.usable(limit)
	return ok
}

// reserve takes a slot for a stream about to be opened.
func (c *conn) reserve(limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	load := len(c.streams) + c.reserved
	if c.closed || c.goAwayRecv || c.goAwaySent || load >= min(limit, int(c.peerMaxStreams)) {
		return false
	}
	c.reserved++
	return true
}
