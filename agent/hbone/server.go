//lint:file-ignore SA1019 x/net/http2 v0.62 deprecates its API in favour of net/http (where HTTP/2 moves in Go 1.27); the design card requires x/net/http2, see docs/hbone.md.

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

// Handler serves tunnels. ServeTunnel must call exactly one of t.Refuse or
// t.Accept; after Accept it owns the stream until it returns, and returning
// ends the stream. Per HTTP/2 server semantics in golang.org/x/net/http2, the
// response half of the stream is closed only when ServeTunnel returns.
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
	// DefaultMaxStreams), advertised in SETTINGS_MAX_CONCURRENT_STREAMS.
	MaxStreams int
	// HandshakeTimeout bounds the TLS handshake (default 10 s).
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection without streams after this long
	// (default 10 minutes; the client pool normally closes first).
	IdleTimeout time.Duration
	Flow        FlowControl
}

// Server is the inbound side of HBONE for one workload.
type Server struct {
	cfg ServerConfig
	log *slog.Logger
	hs  *http.Server // carries x/net/http2's graceful-shutdown hook only
	h2  *http2.Server

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	lns    map[net.Listener]struct{}
	closed bool
	wg     sync.WaitGroup
}

// NewServer validates cfg.
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
	fc, err := cfg.Flow.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("creating HBONE server: %w", err)
	}
	cfg.Flow = fc
	s := &Server{
		cfg:   cfg,
		log:   cfg.Logger.With("spiffe_id", cfg.Local.String()),
		hs:    &http.Server{},
		conns: make(map[net.Conn]struct{}),
		lns:   make(map[net.Listener]struct{}),
	}
	s.h2 = &http2.Server{
		MaxConcurrentStreams:         uint32(cfg.MaxStreams),
		MaxReadFrameSize:             fc.MaxFrameSize,
		MaxUploadBufferPerConnection: fc.ConnWindow,
		MaxUploadBufferPerStream:     fc.StreamWindow,
		IdleTimeout:                  cfg.IdleTimeout,
		// Find dead clients under idle streams, like the pool does.
		ReadIdleTimeout: 30 * time.Second,
		PingTimeout:     15 * time.Second,
	}
	if err := http2.ConfigureServer(s.hs, s.h2); err != nil {
		return nil, fmt.Errorf("configuring HTTP/2 server: %w", err)
	}
	return s, nil
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
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

func (s *Server) serveConn(ctx context.Context, c net.Conn) {
	remote, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	log := s.log.With("src", remote.String())
	cfg, err := s.cfg.TLS.ServerTLS(s.cfg.Local)
	if err != nil {
		log.Error("no TLS config for HBONE listener; refusing connection", "error", err)
		resetConn(c)
		return
	}
	tc := tls.Server(c, cfg)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	err = tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		// Plaintext, a foreign trust domain or a wrong identity all end
		// here; the TLS alert has told the client why.
		log.Debug("HBONE TLS handshake failed", "error", err)
		resetConn(c)
		return
	}
	cs := tc.ConnectionState()
	if err := checkConnState(cs); err != nil {
		log.Debug("HBONE connection refused", "error", err)
		resetConn(c)
		return
	}
	peer, err := PeerID(cs)
	if err != nil {
		log.Debug("HBONE connection refused", "error", err)
		resetConn(c)
		return
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.serveStream(w, r, peer, remote)
	})
	s.h2.ServeConn(tc, &http2.ServeConnOpts{Context: ctx, BaseConfig: s.hs, Handler: h})
}

func (s *Server) serveStream(w http.ResponseWriter, r *http.Request, peer spiffeid.ID, remote netip.AddrPort) {
	if r.Method != http.MethodConnect {
		// 400 like ztunnel, not 405: nothing but CONNECT exists here.
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	target, err := ParseAuthority(r.Host)
	if err != nil {
		s.log.Debug("HBONE CONNECT refused", "peer", peer.String(), "error", err)
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	t := &Tunnel{w: w, r: r, rc: http.NewResponseController(w)}
	req := &Request{Peer: peer, Target: target, Header: r.Header, RemoteAddr: remote}
	s.cfg.Handler.ServeTunnel(r.Context(), req, t)
	switch {
	case t.state == tunnelNew:
		s.log.Error("HBONE handler neither accepted nor refused a tunnel", "dst", target.String())
		w.WriteHeader(http.StatusInternalServerError)
	case t.state == tunnelAccepted && t.reset:
		// x/net/http2 answers this panic with RST_STREAM and no log.
		panic(http.ErrAbortHandler)
	}
}

// Drain stops accepting, sends GOAWAY on every connection so that peers
// open no new streams here, and waits until all streams have finished or
// ctx is done; then it closes what is left. It returns ctx.Err() if it had
// to cut connections.
func (s *Server) Drain(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.lns {
		ln.Close()
	}
	s.mu.Unlock()
	// http.Server.Shutdown runs x/net/http2's graceful shutdown (GOAWAY,
	// then close each connection when its last stream ends). It tracks no
	// listeners or HTTP/1 connections of ours, so it returns at once.
	_ = s.hs.Shutdown(ctx)
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
	for ln := range s.lns {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
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
// Read and Write may be used concurrently by one reader and one writer.
type Tunnel struct {
	w     http.ResponseWriter
	r     *http.Request
	rc    *http.ResponseController
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
	t.w.WriteHeader(status)
}

// Accept answers 200 and sends the response headers at once.
func (t *Tunnel) Accept() error {
	if t.state != tunnelNew {
		return errors.New("hbone: tunnel already answered")
	}
	t.state = tunnelAccepted
	t.w.WriteHeader(http.StatusOK)
	if err := t.rc.Flush(); err != nil {
		return fmt.Errorf("sending CONNECT response: %w", err)
	}
	return nil
}

// Read reads bytes the client sent; io.EOF means the client half-closed.
func (t *Tunnel) Read(p []byte) (int, error) { return t.r.Body.Read(p) }

// Write sends p to the client and flushes it.
func (t *Tunnel) Write(p []byte) (int, error) {
	n, err := t.w.Write(p)
	if err != nil {
		return n, err
	}
	if err := t.rc.Flush(); err != nil {
		return n, err
	}
	return n, nil
}

// Reset makes the stream end with RST_STREAM instead of END_STREAM when the
// handler returns, so that the client sees an error rather than a clean
// close (the application reset its connection).
func (t *Tunnel) Reset() { t.reset = true }

// resetConn closes c with an RST rather than a FIN where possible.
func resetConn(c net.Conn) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	}
	c.Close()
}
