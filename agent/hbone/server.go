package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// Request is a validated CONNECT from an authenticated peer.
type Request struct {
	Peer       spiffeid.ID    // the client's SPIFFE ID, verified by mTLS
	Target     netip.AddrPort // parsed :authority
	Header     http.Header    // request headers (baggage, forwarded, traceparent, ...)
	RemoteAddr netip.AddrPort // TCP peer of the tunnel (the source node or pod)
}

// Handler serves tunnels. ServeTunnel runs in a goroutine of its own per
// stream and must call exactly one of t.Refuse or t.Accept; after Accept
// it owns the stream until it returns. Returning ends the stream: with
// END_STREAM if the handler has not sent it (or RST_STREAM after
// t.Reset), and with RST_STREAM NO_ERROR if the client is still sending.
// A handler that wants both half-closes to travel independently uses
// t.Relay, which returns only when both directions are over.
type Handler interface {
	ServeTunnel(ctx context.Context, req *Request, t *Tunnel)
}

// ServerConfig configures a Server.
type ServerConfig struct {
	Local   spiffeid.ID // the workload whose HBONE listener this is
	TLS     ServerTLS   // required
	Handler Handler     // required
	Logger  *slog.Logger
	// MaxStreams caps concurrent streams per connection (default
	// DefaultMaxStreams), advertised in SETTINGS_MAX_CONCURRENT_STREAMS. A
	// stream counts until its handler returns, also after the client
	// reset it, so rapid resets cannot pile up handlers.
	MaxStreams int
	// HandshakeTimeout bounds the TLS handshake, then the HTTP/2 preface
	// with the client's first SETTINGS, and the rest of any header block
	// split into CONTINUATION frames (default 10 s).
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection without streams after this long
	// (default 10 minutes; the client pool normally closes first).
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's header block, encoded and decoded
	// (default DefaultMaxHeaderBytes). A larger block closes the
	// connection.
	MaxHeaderBytes int
	// MaxHandshakes bounds the connections in their TLS handshake at once
	// (unauthenticated); more are closed at once (default 128).
	MaxHandshakes int
	// MaxConnsPerPeer bounds the connections from one IP address,
	// handshaking or established (default 64).
	MaxConnsPerPeer int
	// PingInterval and PingTimeout find dead clients under idle streams
	// (defaults 30 s and 15 s), as in PoolConfig.
	PingInterval, PingTimeout time.Duration
	Flow                      FlowControl
}

// ServerStats are a Server's counters and gauges, for metrics.
type ServerStats struct {
	Conns              int    // established connections
	Streams            int    // open streams (running handlers)
	HandshakesInFlight int    // connections in their TLS handshake
	Handshakes         uint64 // successful TLS handshakes
	HandshakeErrors    uint64 // failed TLS handshakes and refused identities
	ExpiredConns       uint64 // connections that stopped taking streams because a certificate of their handshake expired
	LimitStats
}

// Server is the inbound side of HBONE for one workload.
type Server struct {
	cfg  ServerConfig
	log  *slog.Logger
	ccfg *connConfig
	ctr  counters

	inHandshake atomic.Int32

	mu       sync.Mutex
	conns    map[net.Conn]*conn // nil while handshaking
	perPeer  map[netip.Addr]int
	lns      map[net.Listener]struct{}
	closed   bool
	draining bool
	wg       sync.WaitGroup
}

// NewServer validates cfg.
// errServerClosed ends the connections of a server that is closed (not
// drained): their streams are reset.
var errServerClosed = errors.New("HBONE server closed")

func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.TLS == nil || cfg.Handler == nil {
		return nil, errors.New("creating HBONE server: ServerConfig.TLS and Handler are required")
	}
	if cfg.Local.IsZero() {
		return nil, errors.New("creating HBONE server: ServerConfig.Local (the workload's SPIFFE ID) is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxStreams <= 0 {
		cfg.MaxStreams = DefaultMaxStreams
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 10 * time.Minute
	}
	if cfg.MaxHeaderBytes <= 0 {
		cfg.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	if cfg.MaxHandshakes <= 0 {
		cfg.MaxHandshakes = 128
	}
	if cfg.MaxConnsPerPeer <= 0 {
		cfg.MaxConnsPerPeer = 64
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = 30 * time.Second
	}
	if cfg.PingTimeout <= 0 {
		cfg.PingTimeout = 15 * time.Second
	}
	fc, err := cfg.Flow.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("creating HBONE server: %w", err)
	}
	cfg.Flow = fc
	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger.With("spiffe_id", cfg.Local.String()),
		conns:   make(map[net.Conn]*conn),
		perPeer: make(map[netip.Addr]int),
		lns:     make(map[net.Listener]struct{}),
	}
	s.ccfg = &connConfig{
		server:         true,
		flow:           fc,
		maxStreams:     cfg.MaxStreams,
		maxHeaderBytes: cfg.MaxHeaderBytes,
		pingInterval:   cfg.PingInterval,
		pingTimeout:    cfg.PingTimeout,
		idleTimeout:    cfg.IdleTimeout,
		prefaceTimeout: cfg.HandshakeTimeout,
		log:            s.log,
		ctr:            &s.ctr,
		serve:          s.serveStream,
	}
	return s, nil
}

// Stats returns the server's counters.
func (s *Server) Stats() ServerStats {
	st := ServerStats{
		HandshakesInFlight: int(s.inHandshake.Load()),
		Handshakes:         s.ctr.handshakes.Load(),
		HandshakeErrors:    s.ctr.handshakeErrors.Load(),
		ExpiredConns:       s.ctr.certExpired.Load(),
		LimitStats:         s.ctr.limits(),
	}
	s.mu.Lock()
	for _, c := range s.conns {
		if c == nil {
			continue
		}
		st.Conns++
		c.mu.Lock()
		st.Streams += c.handlers
		c.mu.Unlock()
	}
	s.mu.Unlock()
	return st
}

// Serve accepts HBONE connections on ln until ctx is done, ln fails, or the
// server is drained or closed. It closes ln before returning. It returns
// nil after Drain or Close or when ctx is done.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer func() {
		s.mu.Lock()
		delete(s.lns, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				s.mu.Lock()
				closed := s.closed
				s.mu.Unlock()
				if closed || ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("accepting HBONE connections: %w", err)
			}
			// Out of file descriptors and the like: back off and go on.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accepting HBONE connection failed", "error", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return nil
			}
		}
		backoff = 0
		if !s.track(c) {
			c.Close()
			return nil
		}
		go func() {
			defer s.untrack(c)
			s.serveConn(ctx, c)
		}()
	}
}

// ServeConn serves one accepted connection and returns when it is closed.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	if !s.track(c) {
		c.Close()
		return
	}
	defer s.untrack(c)
	s.serveConn(ctx, c)
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = nil
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

// admit applies the per-peer and handshake limits to a new connection.
func (s *Server) admit(addr netip.Addr) bool {
	s.mu.Lock()
	if s.perPeer[addr] >= s.cfg.MaxConnsPerPeer {
		s.mu.Unlock()
		s.ctr.peerLimit.Add(1)
		s.ctr.logOnce(&s.ctr.loggedPeer, s.log, "too many HBONE connections from one peer address; closing new ones (logged once)",
			"src", addr.String(), "limit", s.cfg.MaxConnsPerPeer)
		return false
	}
	s.perPeer[addr]++
	s.mu.Unlock()
	if int(s.inHandshake.Add(1)) > s.cfg.MaxHandshakes {
		s.inHandshake.Add(-1)
		s.release(addr)
		s.ctr.handshakeLimit.Add(1)
		s.ctr.logOnce(&s.ctr.loggedHandshake, s.log, "too many HBONE TLS handshakes in flight; closing new connections (logged once)",
			"src", addr.String(), "limit", s.cfg.MaxHandshakes)
		return false
	}
	return true
}

func (s *Server) release(addr netip.Addr) {
	s.mu.Lock()
	if s.perPeer[addr]--; s.perPeer[addr] <= 0 {
		delete(s.perPeer, addr)
	}
	s.mu.Unlock()
}

func (s *Server) serveConn(ctx context.Context, c net.Conn) {
	remote := addrPort(c.RemoteAddr())
	if !s.admit(remote.Addr()) {
		ResetConn(c)
		return
	}
	defer s.release(remote.Addr())
	tc, bc, peer, expiry, err := s.handshake(ctx, c, remote)
	s.inHandshake.Add(-1)
	if err != nil {
		s.ctr.handshakeErrors.Add(1)
		// Plaintext, a foreign trust domain or a wrong identity all end
		// here; the TLS alert has told the client why.
		s.log.Debug("HBONE connection refused", "src", remote.String(), "error", err)
		ResetConn(c)
		return
	}
	s.ctr.handshakes.Add(1)
	hc := newConn(ctx, tc, bc, s.ccfg, peer, remote)
	if err := hc.preface(); err != nil {
		return
	}
	s.mu.Lock()
	if _, ok := s.conns[c]; ok {
		s.conns[c] = hc
	}
	draining, closed := s.draining, s.closed
	s.mu.Unlock()
	switch {
	case closed && !draining:
		hc.fail(errServerClosed)
	case draining:
		hc.goAway(http2.ErrCodeNo, "draining")
	}
	// Once the client's SVID (or ours) has expired, streams beyond the
	// GOAWAY are refused: the client must handshake again.
	hc.drainAt(expiry, &s.ctr.certExpired)
	hc.serve()
}

// handshake authenticates the client; it returns the connection, the
// client's ID and when the first certificate of the handshake expires.
func (s *Server) handshake(ctx context.Context, c net.Conn, remote netip.AddrPort) (*tls.Conn, *batchConn, spiffeid.ID, time.Time, error) {
	cfg, err := s.cfg.TLS.ServerTLS(s.cfg.Local)
	if err != nil {
		s.log.Error("no TLS config for HBONE listener; refusing connection", "error", err)
		return nil, nil, spiffeid.ID{}, time.Time{}, err
	}
	cfg = cfg.Clone()
	cfg.DynamicRecordSizingDisabled = true
	var own ownCert
	own.record(cfg)
	bc := newBatchConn(c)
	tc := tls.Server(bc, cfg)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	err = tc.HandshakeContext(hctx)
	timedOut := hctx.Err() == context.DeadlineExceeded
	cancel()
	if err != nil {
		if timedOut {
			s.ctr.timeouts.Add(1)
			s.ctr.logOnce(&s.ctr.loggedTimeout, s.log, "HBONE peer too slow; closing its connection (logged once)", "phase", "TLS handshake", "src", remote.String())
		}
		return nil, nil, spiffeid.ID{}, time.Time{}, fmt.Errorf("TLS handshake: %w", err)
	}
	cs := tc.ConnectionState()
	if err := checkConnState(cs); err != nil {
		return nil, nil, spiffeid.ID{}, time.Time{}, err
	}
	peer, err := PeerID(cs)
	if err != nil {
		return nil, nil, spiffeid.ID{}, time.Time{}, err
	}
	expiry := certsExpiry(cs, &own)
	if err := expiredAt(expiry); err != nil {
		return nil, nil, spiffeid.ID{}, time.Time{}, err
	}
	return tc, bc, peer, expiry, nil
}

// serveStream runs the handler of a validated CONNECT in its own
// goroutine, owned by the connection.
func (s *Server) serveStream(c *conn, st *stream, req *Request) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer c.handlerDone()
		t := &Tunnel{s: st}
		s.cfg.Handler.ServeTunnel(st.ctx, req, t)
		t.finish(s.log, req)
	}()
}

// Drain stops accepting, sends GOAWAY on every connection so that peers
// open no new streams here, and waits until all streams have finished or
// ctx is done; then it closes what is left. It returns ctx.Err() if it had
// to cut connections.
func (s *Server) Drain(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	s.draining = true
	for ln := range s.lns {
		ln.Close()
	}
	var conns []*conn
	for _, c := range s.conns {
		if c != nil {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.goAway(http2.ErrCodeNo, "draining")
	}
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.Close()
		<-done
		return fmt.Errorf("draining HBONE server: %w", ctx.Err())
	}
}

// Close stops accepting and closes every connection at once, resetting
// their streams, and waits for their goroutines.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	s.draining = false
	for ln := range s.lns {
		ln.Close()
	}
	var conns []*conn
	for raw, c := range s.conns {
		if c != nil {
			conns = append(conns, c)
		} else {
			raw.Close()
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.fail(errServerClosed)
	}
	s.wg.Wait()
	return nil
}

type tunnelState uint8

const (
	tunnelNew tunnelState = iota
	tunnelAccepted
	tunnelRefused
)

// Tunnel is the server end of one CONNECT stream, handed to a Handler.
// Read and Write may be used concurrently by one reader and one writer;
// Relay replaces both.
type Tunnel struct {
	s     *stream
	state tunnelState
	reset bool
}

// Refuse answers the CONNECT with status (400 for a bad target, 401 for a
// policy denial, 503 when the application cannot be reached) and ends it.
func (t *Tunnel) Refuse(status int) {
	if t.state != tunnelNew {
		return
	}
	t.state = tunnelRefused
	_ = t.s.respond(status, true)
}

// Accept answers 200 and sends the response headers at once.
func (t *Tunnel) Accept() error {
	if t.state != tunnelNew {
		return errors.New("hbone: tunnel already answered")
	}
	t.state = tunnelAccepted
	if err := t.s.respond(http.StatusOK, false); err != nil {
		return fmt.Errorf("sending CONNECT response: %w", err)
	}
	return nil
}

// Read reads bytes the client sent; io.EOF means the client half-closed.
func (t *Tunnel) Read(p []byte) (int, error) { return t.s.read(p) }

// Write sends p to the client.
func (t *Tunnel) Write(p []byte) (int, error) { return t.s.write(p) }

// CloseWrite half-closes the stream towards the client (END_STREAM); the
// client can go on sending.
func (t *Tunnel) CloseWrite() error { return t.s.closeSend() }

// Reset makes the stream end with RST_STREAM instead of END_STREAM when the
// handler returns, so that the client sees an error rather than a clean
// close (the application reset its connection).
func (t *Tunnel) Reset() { t.reset = true }

// Relay copies between app and the tunnel until both directions are over,
// after Accept: the client's END_STREAM becomes a FIN on app
// (CloseWrite), app's EOF becomes END_STREAM, in either order, and a
// reset on either side resets the other. sent counts bytes delivered to
// app, recv bytes read from app. It returns nil when both directions ended
// cleanly, else the error; it does not close app (close it with a reset
// after an error). See Stream.Relay for how the copy works.
func (t *Tunnel) Relay(app net.Conn, sent, recv *atomic.Int64) error {
	if t.state != tunnelAccepted {
		return errors.New("hbone: Relay before Accept")
	}
	return t.s.relay(app, recv, sent)
}

// finish ends the stream when the handler returns.
func (t *Tunnel) finish(log *slog.Logger, req *Request) {
	s := t.s
	switch t.state {
	case tunnelNew:
		log.Error("HBONE handler neither accepted nor refused a tunnel", "dst", req.Target.String())
		_ = s.respond(http.StatusInternalServerError, true)
	case tunnelAccepted:
		if t.reset {
			s.abort(errors.New("hbone: tunnel reset by its handler"), http2.ErrCodeConnect)
		} else {
			_ = s.closeSend()
		}
	}
	s.stopPeer()
	s.cancel()
}

// ResetConn closes c with an RST rather than a FIN where possible (a
// *net.TCPConn gets SO_LINGER 0, a StreamConn RST_STREAM), so that the peer sees a failure instead
// of a clean end of stream. agent/proxy uses it for its plain connections.
func ResetConn(c net.Conn) {
	if sc, ok := c.(*StreamConn); ok {
		sc.Reset()
		sc.Close()
		return
	}
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	}
	c.Close()
}

// addrPort returns a's address and port, IPv4 unmapped.
func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
