package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
)

// Config configures a Proxy. Resolver, Pool, ServerTLS and Policy are
// required.
type Config struct {
	Logger   *slog.Logger
	Resolver Resolver
	// Pool carries outbound tunnels; the caller owns it (and closes it
	// after the Proxy).
	Pool *hbone.Pool
	// ServerTLS provides each workload's HBONE listener configuration.
	ServerTLS hbone.ServerTLS
	// Dialer opens passthrough and application connections (default: a
	// net.Dialer).
	Dialer Dialer
	// Policy is consulted for every new connection (inbound plaintext
	// included: it owns the mTLS mode) and by Reevaluate. There is no
	// default: a proxy without a policy is a construction error.
	Policy Policy
	// AgentPorts may not be targeted by a tunnel (default DefaultAgentPorts).
	AgentPorts []uint16
	// ConnectTimeout bounds dialing a passthrough destination or the
	// application (default 5 s). HBONE setup is bounded by the pool's.
	ConnectTimeout time.Duration
	// Observer receives connection events for metrics and access logs
	// (default: none).
	Observer Observer
	// HBONE tunes the inbound HBONE servers (MaxStreams, Flow, timeouts);
	// Local, TLS, Handler and Logger are filled in per workload.
	HBONE hbone.ServerConfig
	// MaxInboundPlaintext bounds the open inbound plaintext (15006)
	// connections of one pod (default 1024). Any pod can open them, each
	// costs goroutines and copy buffers while it lasts, so beyond the limit
	// new ones are reset (RefusedLimit) and the first one per minute and
	// pod is logged.
	MaxInboundPlaintext int
	// L7 handles the connections of Services opted in to HTTP handling
	// (nil: every connection stays at L4, as when L7 does not exist).
	L7 L7
}

// Proxy handles the captured connections of the workloads on a node. One
// Proxy serves any number of listeners (three per enrolled pod).
type Proxy struct {
	cfg Config
	log *slog.Logger
	bal balancer
	trk tracker
	// l7trk tracks outbound connections served by the L7 layer: listed,
	// drained and closed, but not reported to the Observer (the upstream
	// connections of their requests are, in trk).
	l7trk tracker

	ctx    context.Context // parent of every connection; cancelled by Close
	cancel context.CancelFunc

	// Refusals an application can cause at will (connecting to the
	// agent's in-pod listeners directly) are counted every time but
	// logged at most once a minute each, so a pod cannot flood the log.
	noOrigDstLog, loopLog logLimiter

	mu       sync.Mutex
	lns      map[net.Listener]struct{}
	servers  map[*hbone.Server]struct{}
	retired  hbone.ServerStats // counters of the servers gone
	stopping bool              // Drain or Close called: accept nothing new
	closed   bool              // Close called: start no goroutine
	wg       sync.WaitGroup    // accept loops, connection goroutines, tunnel handlers
}

// New validates cfg and returns a Proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.Resolver == nil || cfg.Pool == nil || cfg.ServerTLS == nil || cfg.Policy == nil {
		return nil, errors.New("creating proxy: Config.Resolver, Pool, ServerTLS and Policy are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Dialer == nil {
		cfg.Dialer = &net.Dialer{}
	}
	if cfg.AgentPorts == nil {
		cfg.AgentPorts = DefaultAgentPorts
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	if cfg.MaxInboundPlaintext <= 0 {
		cfg.MaxInboundPlaintext = 1024
	}
	p := &Proxy{
		cfg:     cfg,
		log:     cfg.Logger,
		lns:     make(map[net.Listener]struct{}),
		servers: make(map[*hbone.Server]struct{}),
	}
	p.trk.obs = cfg.Observer
	p.l7trk.obs = nopObserver{}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p, nil
}

// ErrStopped is returned by Serve methods called after Drain or Close.
var ErrStopped = errors.New("proxy is stopping")

func (p *Proxy) validWorkload(w *Workload) error {
	if w == nil || w.Identity.IsZero() || len(w.IPs) == 0 {
		return errors.New("serving workload: Workload with an Identity and at least one IP is required")
	}
	return nil
}

// ServeOutbound accepts the outbound connections of w captured to ln
// (127.0.0.1:15001 in w's network namespace). origDst recovers each
// connection's original destination. It returns nil when ctx is done or the
// proxy stops, and closes ln.
func (p *Proxy) ServeOutbound(ctx context.Context, ln net.Listener, w *Workload, origDst OrigDstFunc) error {
	if err := p.validWorkload(w); err != nil {
		ln.Close()
		return err
	}
	if origDst == nil {
		ln.Close()
		return errors.New("serving outbound: OrigDstFunc is required")
	}
	return p.acceptLoop(ctx, ln, "outbound", func(c net.Conn) { p.handleOutbound(c, w, origDst) })
}

// ServeInboundPlaintext accepts plaintext connections to w steered to ln
// (15006). With sk_lookup steering, each accepted socket's local address is
// the original destination: pass a nil origDst. Otherwise origDst
// recovers it.
func (p *Proxy) ServeInboundPlaintext(ctx context.Context, ln net.Listener, w *Workload, origDst OrigDstFunc) error {
	if err := p.validWorkload(w); err != nil {
		ln.Close()
		return err
	}
	held := make(chan struct{}, p.cfg.MaxInboundPlaintext)
	var lastLog atomic.Int64 // unix nanoseconds of the last limit log line
	return p.acceptLoop(ctx, ln, "inbound plaintext", func(c net.Conn) {
		select {
		case held <- struct{}{}:
			defer func() { <-held }()
		default:
			now := time.Now().UnixNano()
			if last := lastLog.Load(); now-last >= int64(time.Minute) && lastLog.CompareAndSwap(last, now) {
				p.log.Warn("inbound plaintext connection limit reached; resetting new connections", "pod", w.String(),
					"limit", cap(held), "src", c.RemoteAddr().String())
			}
			f := &Flow{Direction: Inbound, Transport: TransportPlaintext, Workload: w, Src: addrPortOf(c.RemoteAddr()),
				Dst: addrPortOf(c.LocalAddr()), DstIdentity: w.Identity, DstWorkload: w.String()}
			f.OrigDst = f.Dst
			p.refuse(c, f, time.Now(), RefusedLimit, fmt.Sprintf("%d inbound plaintext connections open to the pod, its limit", cap(held)))
			return
		}
		p.handleInboundPlaintext(c, w, origDst)
	})
}

// ServeInboundHBONE serves HBONE tunnels to w on ln (w's IP, port 15008).
func (p *Proxy) ServeInboundHBONE(ctx context.Context, ln net.Listener, w *Workload) error {
	if err := p.validWorkload(w); err != nil {
		ln.Close()
		return err
	}
	scfg := p.cfg.HBONE
	scfg.Local = w.Identity
	scfg.TLS = p.cfg.ServerTLS
	scfg.Handler = &inboundHandler{p: p, w: w}
	scfg.Logger = p.log.With("pod", w.String())
	srv, err := hbone.NewServer(scfg)
	if err != nil {
		ln.Close()
		return fmt.Errorf("serving HBONE for %s: %w", w, err)
	}
	p.mu.Lock()
	if p.stopping {
		p.mu.Unlock()
		ln.Close()
		return ErrStopped
	}
	p.servers[srv] = struct{}{}
	p.wg.Add(1)
	p.mu.Unlock()
	err = srv.Serve(ctx, ln)
	// The listener is gone (ctx done: the pod left the node or the mesh;
	// or the proxy stops). Tunnels already open continue until they end,
	// GOAWAY tells peers to open no more here, and Close cuts them.
	go func() {
		defer p.wg.Done()
		_ = srv.Drain(p.ctx)
		st := srv.Stats()
		p.mu.Lock()
		delete(p.servers, srv)
		p.retired.AddCounters(st)
		p.mu.Unlock()
	}()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (p *Proxy) acceptLoop(ctx context.Context, ln net.Listener, kind string, handle func(net.Conn)) error {
	p.mu.Lock()
	if p.stopping {
		p.mu.Unlock()
		ln.Close()
		return ErrStopped
	}
	p.lns[ln] = struct{}{}
	p.wg.Add(1)
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.lns, ln)
		p.mu.Unlock()
		ln.Close()
		p.wg.Done()
	}()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			p.mu.Lock()
			stopping := p.stopping
			p.mu.Unlock()
			if stopping || ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accepting %s connections: %w", kind, err)
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			p.log.Warn("accept failed", "listener", kind, "error", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return nil
			}
		}
		backoff = 0
		p.mu.Lock()
		if p.stopping {
			p.mu.Unlock()
			hbone.ResetConn(c)
			return nil
		}
		p.wg.Add(1)
		p.mu.Unlock()
		go func() {
			defer p.wg.Done()
			handle(c)
		}()
	}
}

// Connections lists the open connections.
func (p *Proxy) Connections() []ConnInfo { return append(p.trk.list(), p.l7trk.list()...) }

// CloseConnections resets every open connection for which match returns
// true and returns how many it closed.
func (p *Proxy) CloseConnections(match func(ConnInfo) bool) int {
	m := func(c *conn) bool { return match(c.info()) }
	return p.trk.kill(m, CloseAdmin) + p.l7trk.kill(m, CloseAdmin)
}

// Reevaluate checks every open connection against the current Policy again
// and resets those it now denies (after a policy change). It returns the
// number closed.
func (p *Proxy) Reevaluate(ctx context.Context) int {
	return p.trk.kill(func(c *conn) bool {
		d := p.cfg.Policy.Check(ctx, &c.flow)
		if !d.Allow {
			p.log.Debug("closing connection denied by new policy", "src", c.flow.Src.String(), "dst", c.flow.Dst.String(), "reason", d.Reason)
		}
		return !d.Allow
	}, ClosePolicy)
}

func (p *Proxy) stopAccepting() []*hbone.Server {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopping = true
	for ln := range p.lns {
		ln.Close()
	}
	var srvs []*hbone.Server
	for s := range p.servers {
		srvs = append(srvs, s)
	}
	return srvs
}

// Drain stops accepting on every listener, tells HBONE peers to open no new
// streams here (GOAWAY), and waits for open connections to finish until ctx
// is done; then it resets the rest. It returns ctx.Err() if connections had
// to be cut. Call Close afterwards.
func (p *Proxy) Drain(ctx context.Context) error {
	srvs := p.stopAccepting()
	var wg sync.WaitGroup
	for _, s := range srvs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = s.Drain(ctx)
		}()
	}
	err := p.l7trk.wait(ctx)
	if err == nil {
		err = p.trk.wait(ctx)
	}
	if err != nil {
		all := func(*conn) bool { return true }
		n := p.l7trk.kill(all, CloseDrain) + p.trk.kill(all, CloseDrain)
		p.log.Info("drain deadline reached; reset open connections", "connections", n)
		err = fmt.Errorf("draining proxy: %d connections still open: %w", n, err)
	}
	wg.Wait()
	return err
}

// enter registers a tunnel handler with wg unless the proxy is closed.
func (p *Proxy) enter() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.wg.Add(1)
	return true
}

// Close stops accepting, resets every open connection and waits for all
// goroutines of the proxy.
func (p *Proxy) Close() error {
	srvs := p.stopAccepting()
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cancel()
	p.l7trk.closeAll()
	p.trk.closeAll()
	for _, s := range srvs {
		s.Close()
	}
	p.wg.Wait()
	return nil
}

// refuse resets c and reports the refusal.
func (p *Proxy) refuse(c net.Conn, f *Flow, start time.Time, why RefusalReason, detail string) {
	hbone.ResetConn(c)
	p.report(f, start, why, detail)
}

// report tells the Observer about a refused or failed connection.
func (p *Proxy) report(f *Flow, start time.Time, why RefusalReason, detail string) {
	p.cfg.Observer.Refused(f, &Refusal{Reason: why, Detail: detail, Setup: time.Since(start)})
}

// denied returns the refusal reason of a policy denial.
func denied(d Decision) RefusalReason {
	if d.Refusal == RefusedStrictMTLS {
		return RefusedStrictMTLS
	}
	return RefusedPolicy
}

func (p *Proxy) isAgentPort(port uint16) bool {
	for _, a := range p.cfg.AgentPorts {
		if a == port {
			return true
		}
	}
	return false
}

// TunnelStats sums the counters and gauges of the proxy's inbound HBONE
// servers, including the counters of servers already gone.
func (p *Proxy) TunnelStats() hbone.ServerStats {
	p.mu.Lock()
	total := p.retired
	servers := make([]*hbone.Server, 0, len(p.servers))
	for s := range p.servers {
		servers = append(servers, s)
	}
	p.mu.Unlock()
	for _, s := range servers {
		total.Add(s.Stats())
	}
	return total
}

// logLimiter lets one log line through per interval (a minute by default)
// and counts the ones it held back, which the next line reports.
type logLimiter struct {
	last       atomic.Int64 // unix nanoseconds of the last line
	suppressed atomic.Int64
	interval   time.Duration // 0: a minute
}

// allow reports whether a line may be logged now and, if so, how many were
// held back since the last one.
func (l *logLimiter) allow(now time.Time) (bool, int64) {
	every := l.interval
	if every <= 0 {
		every = time.Minute
	}
	n := now.UnixNano()
	last := l.last.Load()
	if (last == 0 || n-last >= int64(every)) && l.last.CompareAndSwap(last, n) {
		return true, l.suppressed.Swap(0)
	}
	l.suppressed.Add(1)
	return false, 0
}
