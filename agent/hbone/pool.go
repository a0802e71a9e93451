//lint:file-ignore SA1019 x/net/http2 v0.62 deprecates its API in favour of net/http (where HTTP/2 moves in Go 1.27); the design card requires x/net/http2, see docs/hbone.md.

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
	"net/url"
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

// PoolConfig configures a Pool.
type PoolConfig struct {
	TLS    ClientTLS // required
	Dial   DialFunc  // nil: a net.Dialer
	Logger *slog.Logger
	// MaxStreamsPerConn caps the streams on one connection (default
	// DefaultMaxStreams); the server's SETTINGS can lower it further.
	MaxStreamsPerConn int
	// IdleTimeout closes a connection that has carried no stream for this
	// long (default 2 minutes).
	IdleTimeout time.Duration
	// ConnectTimeout bounds TCP connect plus TLS handshake (default 5 s),
	// so that a dead peer turns into an error quickly, not a hang.
	ConnectTimeout time.Duration
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

// PoolStats are monotonic counters and gauges for metrics.
type PoolStats struct {
	Hits            uint64 // streams opened on an existing connection
	Misses          uint64 // streams that needed a new connection
	Handshakes      uint64 // successful TLS handshakes
	HandshakeErrors uint64 // failed dials or handshakes
	Conns           int    // open connections
	Streams         int    // open streams
}

// Pool is the client side of HBONE: a set of HTTP/2 connections to peer
// agents, opened on demand and shared by streams.
//
// At most one handshake per Key is in flight: concurrent Connects to a new
// peer wait for it, and then share the connection. A connection takes at
// most MaxStreamsPerConn streams; past that, or after the server's GOAWAY,
// the next stream opens a new connection. Idle connections are closed after
// IdleTimeout.
type Pool struct {
	cfg PoolConfig
	log *slog.Logger
	t2  *http2.Transport

	mu     sync.Mutex
	keys   map[Key]*keyConns
	closed bool

	ctx    context.Context // cancelled by Close; parent of every dial
	cancel context.CancelFunc
	wg     sync.WaitGroup // janitor and dial goroutines

	hits, misses, handshakes, handshakeErrors atomic.Uint64
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
	cc        *http2.ClientConn
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
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 2 * time.Minute
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 5 * time.Second
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
	// The net/http Transport only carries the HTTP/2 settings; it never
	// dials: every connection comes from NewClientConn below.
	t1 := &http.Transport{HTTP2: &http.HTTP2Config{
		MaxReceiveBufferPerStream:     int(fc.StreamWindow),
		MaxReceiveBufferPerConnection: int(fc.ConnWindow),
		MaxReadFrameSize:              int(fc.MaxFrameSize),
		SendPingTimeout:               cfg.PingInterval,
		PingTimeout:                   cfg.PingTimeout,
	}}
	t2, err := http2.ConfigureTransports(t1)
	if err != nil {
		return nil, fmt.Errorf("configuring HTTP/2 transport: %w", err)
	}
	t2.MaxReadFrameSize = fc.MaxFrameSize
	t2.ReadIdleTimeout = cfg.PingInterval
	t2.PingTimeout = cfg.PingTimeout
	t2.DisableCompression = true
	p := &Pool{
		cfg:  cfg,
		log:  cfg.Logger,
		t2:   t2,
		keys: make(map[Key]*keyConns),
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.wg.Add(1)
	go p.janitor()
	return p, nil
}

// Stats returns the pool's counters.
func (p *Pool) Stats() PoolStats {
	s := PoolStats{
		Hits:            p.hits.Load(),
		Misses:          p.misses.Load(),
		Handshakes:      p.handshakes.Load(),
		HandshakeErrors: p.handshakeErrors.Load(),
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
	// Body is the data to send, read by the HTTP/2 transport until EOF
	// (which half-closes the stream) and then closed. If nil, the stream's
	// Write and CloseWrite methods supply the data instead.
	Body io.ReadCloser
}

// Connect opens a CONNECT stream for r on a pooled connection, dialing and
// handshaking first if no connection to r.Key can take another stream.
// r.Body is always closed, also when Connect fails.
//
// ctx bounds the whole stream, not only its setup: cancelling it resets the
// stream. Close the returned Stream when done.
func (p *Pool) Connect(ctx context.Context, r ConnectRequest) (*Stream, error) {
	if !r.Target.IsValid() {
		if r.Body != nil {
			r.Body.Close()
		}
		return nil, errors.New("opening HBONE stream: invalid target address")
	}
	sctx, cancel := context.WithCancel(ctx)
	s := &Stream{cancel: cancel, key: r.Key}
	body := r.Body
	if body == nil {
		pr, pw := io.Pipe()
		s.pw = pw
		body = pr
	}
	authority := r.Target.String()
	req := &http.Request{
		Method:        http.MethodConnect,
		URL:           &url.URL{Host: authority},
		Host:          authority,
		Header:        r.Header,
		Body:          body,
		ContentLength: -1,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
	}
	if req.Header == nil {
		req.Header = http.Header{}
	}
	req = req.WithContext(sctx)
	pc, err := p.get(sctx, r.Key)
	if err != nil {
		cancel()
		body.Close()
		return nil, err
	}
	resp, err := pc.cc.RoundTrip(req)
	if err != nil {
		p.release(pc)
		cancel()
		return nil, fmt.Errorf("opening HBONE stream to %s via %s: %w", authority, r.Key.Addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		p.release(pc)
		cancel()
		return nil, fmt.Errorf("opening HBONE stream to %s via %s: %w", authority, r.Key.Addr, &ConnectError{Status: resp.StatusCode})
	}
	s.resp = resp
	s.release = func() { p.release(pc) }
	return s, nil
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
		if pc := p.reserveLocked(kc); pc != nil {
			p.mu.Unlock()
			if !dialed {
				p.hits.Add(1)
			}
			return pc, nil
		}
		call := kc.dialing
		if call == nil {
			call = &dialCall{done: make(chan struct{})}
			kc.dialing = call
			dialed = true
			p.misses.Add(1)
			p.wg.Add(1)
			go p.dial(key, kc, call)
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

// reserveLocked takes a stream slot on a usable connection of kc, preferring
// the busiest one below the limit so that idle connections drain and
// close. It also forgets closed connections.
func (p *Pool) reserveLocked(kc *keyConns) *poolConn {
	var best *poolConn
	live := kc.conns[:0]
	for _, pc := range kc.conns {
		st := pc.cc.State()
		if st.Closed {
			continue
		}
		live = append(live, pc)
		if pc.streams >= p.cfg.MaxStreamsPerConn || !pc.cc.CanTakeNewRequest() {
			continue
		}
		if best == nil || pc.streams > best.streams {
			best = pc
		}
	}
	clear(kc.conns[len(live):])
	kc.conns = live
	if best == nil || !best.cc.ReserveNewRequest() {
		return nil
	}
	best.streams++
	return best
}

// dial runs in its own goroutine, owned by the pool, so that a caller that
// gives up does not abort a handshake that other callers wait for.
func (p *Pool) dial(key Key, kc *keyConns, call *dialCall) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.ConnectTimeout)
	cc, err := p.handshake(ctx, key)
	cancel()
	p.mu.Lock()
	kc.dialing = nil
	if err == nil && p.closed {
		cc.Close()
		err = ErrPoolClosed
	}
	if err != nil {
		p.handshakeErrors.Add(1)
		call.err = err
	} else {
		p.handshakes.Add(1)
		kc.conns = append(kc.conns, &poolConn{key: key, cc: cc, idleSince: time.Now()})
	}
	close(call.done)
	p.mu.Unlock()
}

func (p *Pool) handshake(ctx context.Context, key Key) (*http2.ClientConn, error) {
	cfg, err := p.cfg.TLS.ClientTLS(key.Src, key.Dst)
	if err != nil {
		return nil, fmt.Errorf("building TLS config for HBONE %s: %w", key, err)
	}
	raw, err := p.cfg.Dial(context.WithValue(ctx, keyCtx{}, key), "tcp", key.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("dialing HBONE %s (is port %d open on the destination pod, or is a NetworkPolicy blocking it?): %w", key.Addr, key.Addr.Port(), err)
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake for HBONE %s (peer must present SVID %s): %w", key.Addr, key.Dst, err)
	}
	if err := checkConnState(tc.ConnectionState()); err != nil {
		tc.Close()
		return nil, fmt.Errorf("TLS handshake for HBONE %s: %w", key.Addr, err)
	}
	cc, err := p.t2.NewClientConn(tc)
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("starting HTTP/2 on HBONE %s: %w", key.Addr, err)
	}
	p.log.Debug("hbone connection established", "key", key.String())
	return cc, nil
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
	var toClose []*http2.ClientConn
	p.mu.Lock()
	for key, kc := range p.keys {
		live := kc.conns[:0]
		for _, pc := range kc.conns {
			if pc.cc.State().Closed {
				continue
			}
			if pc.streams == 0 && now.Sub(pc.idleSince) >= p.cfg.IdleTimeout {
				toClose = append(toClose, pc.cc)
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
	for _, cc := range toClose {
		cc.Close()
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
	var all []*http2.ClientConn
	for _, kc := range p.keys {
		for _, pc := range kc.conns {
			all = append(all, pc.cc)
		}
	}
	p.keys = map[Key]*keyConns{}
	p.mu.Unlock()
	p.cancel()
	for _, cc := range all {
		cc.Close()
	}
	p.wg.Wait()
	return nil
}

// Stream is one CONNECT stream. Read returns the peer's bytes; Write and
// CloseWrite send bytes when ConnectRequest.Body was nil.
type Stream struct {
	key     Key
	resp    *http.Response
	pw      *io.PipeWriter
	cancel  context.CancelFunc
	once    sync.Once
	release func()
}

// Key returns the pool key of the connection carrying the stream.
func (s *Stream) Key() Key { return s.key }

// Read reads bytes sent by the peer; io.EOF means the peer half-closed.
func (s *Stream) Read(p []byte) (int, error) { return s.resp.Body.Read(p) }

var errBodySupplied = errors.New("hbone stream: Write used with ConnectRequest.Body set")

// Write sends p to the peer.
func (s *Stream) Write(p []byte) (int, error) {
	if s.pw == nil {
		return 0, errBodySupplied
	}
	return s.pw.Write(p)
}

// CloseWrite half-closes the stream (END_STREAM).
func (s *Stream) CloseWrite() error {
	if s.pw == nil {
		return errBodySupplied
	}
	return s.pw.Close()
}

// Close ends the stream, resetting it if either direction is still open,
// and returns its slot to the pool.
func (s *Stream) Close() error {
	s.once.Do(func() {
		s.cancel()
		if s.pw != nil {
			s.pw.CloseWithError(net.ErrClosed)
		}
		s.resp.Body.Close()
		s.release()
	})
	return nil
}
