package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/l7"
)

// L7Target marks a Destination whose Service opted in to HTTP handling
// (docs/l7.md). The Resolver sets it; a Proxy without Config.L7 ignores it.
type L7Target struct {
	// Protocol is what the Service port declares (appProtocol), or
	// l7.Undeclared to detect it from the client's first bytes.
	Protocol l7.Protocol
	// Namespace and Name are the Service's; Port is the Service port the
	// client dialled (routes attach to it).
	Namespace, Name string
	Port            uint16
}

// L7 is the optional HTTP layer (agent/l7/mesh implements it). This is the
// whole seam between the L4 proxy and L7: a Proxy with no L7 handles every
// connection at L4, and with one, a connection reaches it only when its
// Destination carries an L7Target (outbound) or InboundPort claims its
// port (inbound HBONE). Inbound plaintext (15006) is never parsed.
type L7 interface {
	// Outbound serves an outbound connection whose Destination has an
	// L7Target. It owns o.Conn and returns when the connection is over.
	Outbound(o *L7Outbound)
	// InboundPort returns the protocol of connections to port of w, and
	// false when they stay at L4. It is called for every inbound tunnel:
	// it must be a lookup, must not block.
	InboundPort(w *Workload, port uint16) (l7.Protocol, bool)
	// Inbound serves an inbound tunnel to a port InboundPort claimed, after
	// the connection-level policy check allowed it. It owns i.Conn and
	// returns when the connection is over.
	Inbound(i *L7Inbound)
}

// L7Outbound is one outbound connection handed to the L7 layer, with the
// L4 machinery to reach endpoints: resolution, the balancer, egress
// policy, tunnels and connection tracking.
type L7Outbound struct {
	Ctx  context.Context
	Conn net.Conn
	// Flow has the source (Workload, Src, SrcIdentity), the original
	// destination and the Service; Dst and the transport are per request.
	Flow   Flow
	Dest   Destination
	Target L7Target
	p      *Proxy
	start  time.Time
}

// Resolve resolves another destination for the same source (a route's
// backend Service, by its ClusterIP and port).
func (o *L7Outbound) Resolve(dst netip.AddrPort) (Destination, error) {
	d, err := o.p.cfg.Resolver.Resolve(o.Flow.Workload, dst)
	if err == nil && len(d.Endpoints) == 0 {
		err = ErrNoEndpoints
	}
	return d, err
}

// Pick chooses an endpoint of d with the L4 balancer (power of two choices
// over what this proxy has in flight); call release when the request ends.
func (o *L7Outbound) Pick(eps []Endpoint) (ep Endpoint, release func()) {
	i, release := o.p.bal.pick(eps)
	return eps[i], release
}

// Dial opens a connection to ep, an endpoint of the Service service
// ("namespace/name", "" for none), the way an L4 connection would: egress
// policy, then an HBONE tunnel to an enrolled endpoint or plaintext
// otherwise. The connection is tracked (listed, re-evaluated, drained,
// counted in the L4 metrics) until it is closed. Refusals are reported to
// the Observer as for L4 connections and returned as errors.
func (o *L7Outbound) Dial(ctx context.Context, service string, ep Endpoint) (net.Conn, error) {
	p := o.p
	start := time.Now()
	c := &conn{start: start, flow: o.Flow}
	c.flow.Transport = TransportPlaintext
	c.flow.Dst = ep.Addr
	c.flow.Service = service
	c.flow.DstWorkload = ep.Workload
	c.flow.DstIdentity = ep.Identity
	if ep.Enrolled {
		c.flow.Transport = TransportHBONE
	}
	if dec := p.cfg.Policy.Check(p.ctx, &c.flow); !dec.Allow {
		p.report(&c.flow, start, denied(dec), "denied: "+dec.Reason)
		return nil, fmt.Errorf("egress to %s: %w: %s", ep.Addr, ErrDenied, dec.Reason)
	}
	if !ep.Enrolled {
		dctx, cancel := context.WithTimeout(context.WithValue(ctx, flowKey{}, &c.flow), p.cfg.ConnectTimeout)
		up, err := p.cfg.Dialer.DialContext(dctx, "tcp", ep.Addr.String())
		cancel()
		if err != nil {
			p.report(&c.flow, start, FailedDial, "dialing the destination: "+err.Error())
			return nil, fmt.Errorf("dialing %s: %w", ep.Addr, err)
		}
		c.kill = func() { hbone.ResetConn(up) }
		p.trk.add(c)
		return &countedConn{Conn: up, c: c, done: func() { p.trk.remove(c) }}, nil
	}
	port := ep.TunnelPort
	if port == 0 {
		port = hbone.Port
	}
	sctx, cancel := context.WithCancel(p.ctx)
	s, err := p.cfg.Pool.Connect(sctx, hbone.ConnectRequest{
		Key:    hbone.Key{Src: c.flow.SrcIdentity, Dst: ep.Identity, Addr: netip.AddrPortFrom(ep.Addr.Addr(), port), SrcNetns: c.flow.Workload.Netns},
		Target: ep.Addr,
		Header: connectHeader(&c.flow),
	})
	if err != nil {
		cancel()
		p.report(&c.flow, start, FailedTunnel, "opening the tunnel: "+err.Error())
		return nil, fmt.Errorf("opening the tunnel to %s: %w", ep.Addr, err)
	}
	// The L7 layer's transport reads and writes the stream itself
	// (hbone.StreamConn): no socket or copy goroutine in between.
	sc, err := s.Conn(addrOf(c.flow.Src), addrOf(ep.Addr), &c.recv, &c.sent)
	if err != nil {
		cancel()
		s.Close()
		return nil, err
	}
	c.kill = func() {
		cancel()
		sc.Reset()
	}
	if !p.enter() {
		cancel()
		sc.Close()
		return nil, ErrStopped
	}
	p.wg.Done()
	p.trk.add(c)
	return &countedConn{Conn: sc, done: func() {
		cancel()
		if sc.Failed() {
			c.failed.Store(true)
		}
		p.trk.remove(c)
	}}, nil
}

// FallbackL4 handles the connection at L4 after all (it turned out not to
// be HTTP): c is o.Conn with the bytes already read put back (l7.Replay).
func (o *L7Outbound) FallbackL4(c net.Conn) {
	o.p.outboundL4(c, &o.Flow, o.Dest, o.start)
}

// L7Inbound is one inbound tunnel handed to the L7 layer: Conn carries the
// tunnel's bytes; the connection-level policy check has allowed it.
type L7Inbound struct {
	Ctx  context.Context
	Conn net.Conn
	// Flow is the tunnel's flow (Flow.L7 is true): the verified peer, the
	// local workload and the target.
	Flow     Flow
	Protocol l7.Protocol
	p        *Proxy
	start    time.Time
}

// DialApp opens a connection to the application (Flow.Dst) with the
// proxy's Dialer, as an L4 inbound connection would.
func (i *L7Inbound) DialApp(ctx context.Context) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(context.WithValue(ctx, flowKey{}, &i.Flow), i.p.cfg.ConnectTimeout)
	defer cancel()
	c, err := i.p.cfg.Dialer.DialContext(dctx, "tcp", i.Flow.Dst.String())
	if err != nil {
		return nil, fmt.Errorf("dialing the application %s: %w", i.Flow.Dst, err)
	}
	return c, nil
}

// FallbackL4 handles the tunnel at L4 after all (it turned out not to be
// HTTP): the policy is checked again as an L4 connection (an ALLOW rule
// with L7 fields then matches nothing), then c is piped to the
// application. c is i.Conn with the bytes already read put back.
func (i *L7Inbound) FallbackL4(c net.Conn) {
	p := i.p
	f := i.Flow
	f.L7 = false
	if dec := p.cfg.Policy.Check(i.Ctx, &f); !dec.Allow {
		p.log.Debug("L4 fallback denied by policy", "pod", f.Workload.String(), "dst", f.Dst.String(), "reason", dec.Reason)
		p.refuse(c, &f, i.start, denied(dec), "denied: "+dec.Reason)
		return
	}
	app, err := i.DialApp(i.Ctx)
	if err != nil {
		p.refuse(c, &f, i.start, FailedDial, err.Error())
		return
	}
	pipeConns(c, app, new(atomic.Int64), new(atomic.Int64))
}

// ErrDenied is wrapped by L7Outbound.Dial when egress policy refuses.
var ErrDenied = fmt.Errorf("denied by policy")

// outboundL7 hands an outbound connection to the L7 layer, tracked (for
// listing, drain and close) without being reported as an L4 connection:
// its requests' upstream connections are.
func (p *Proxy) outboundL7(app net.Conn, pre *Flow, d Destination, start time.Time) {
	o := &L7Outbound{Ctx: p.ctx, Conn: app, Flow: *pre, Dest: d, Target: *d.L7, p: p, start: start}
	o.Flow.L7 = true
	c := &conn{start: start, flow: o.Flow, kill: func() { hbone.ResetConn(app) }}
	p.l7trk.add(c)
	defer p.l7trk.remove(c)
	p.cfg.L7.Outbound(o)
}

// inboundL7 serves an accepted tunnel through the L7 layer, which reads
// and writes the stream itself (hbone.StreamConn): a net.Conn with
// deadlines and half-close, as net/http needs, without a socket or copy
// goroutine in between.
func (p *Proxy) inboundL7(ctx context.Context, t *hbone.Tunnel, c *conn, proto l7.Protocol) {
	sc, err := t.Conn(addrOf(c.flow.Dst), addrOf(c.flow.Src), &c.recv, &c.sent)
	if err != nil {
		p.log.Warn("L7 inbound: using the tunnel as a connection", "error", err)
		t.Reset()
		return
	}
	c.kill = sc.Reset
	p.trk.add(c)
	defer p.trk.remove(c)
	p.cfg.L7.Inbound(&L7Inbound{Ctx: ctx, Conn: sc, Flow: c.flow, Protocol: proto, p: p, start: c.start})
	sc.Close()
	if sc.Failed() {
		c.failed.Store(true)
	}
}

// addrOf returns a as a net.Addr (LocalAddr, RemoteAddr of a tunnel used
// as a connection).
func addrOf(a netip.AddrPort) net.Addr { return net.TCPAddrFromAddrPort(a) }

// countedConn is an upstream connection lent to the L7 layer; done runs
// once after Close.
type countedConn struct {
	net.Conn
	c    *conn // non-nil: count bytes here (plaintext upstreams)
	once sync.Once
	done func()
}

func (u *countedConn) Read(b []byte) (int, error) {
	n, err := u.Conn.Read(b)
	if u.c != nil {
		u.c.recv.Add(int64(n))
	}
	return n, err
}

func (u *countedConn) Write(b []byte) (int, error) {
	n, err := u.Conn.Write(b)
	if u.c != nil {
		u.c.sent.Add(int64(n))
	}
	return n, err
}

// NetConn returns the connection lent (a socket or a tunnel stream), for
// a look at its state (the L7 layer peeks at an idle socket before reusing
// it). Reads and writes must go through u.
func (u *countedConn) NetConn() net.Conn { return u.Conn }

func (u *countedConn) Close() error {
	err := u.Conn.Close()
	u.once.Do(u.done)
	return err
}
