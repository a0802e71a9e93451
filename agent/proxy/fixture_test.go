package proxy_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/hbone/hbonetest"
	"github.com/nodemesh/nodemesh/agent/proxy"
)

// The fixture is two "nodes" (two Proxies) on loopback. Pod A (127.0.0.1)
// is the client on node 1; pods B1 (127.0.0.2) and B2 (127.0.0.4) are
// enrolled servers on node 2 behind the Service VIP svcVIP; pod C
// (127.0.0.3) is not enrolled. Every listener uses an ephemeral port, so
// the HBONE port is carried in Endpoint.TunnelPort.
var (
	ipA    = netip.MustParseAddr("127.0.0.1")
	ipB1   = netip.MustParseAddr("127.0.0.2")
	ipC    = netip.MustParseAddr("127.0.0.3")
	ipB2   = netip.MustParseAddr("127.0.0.4")
	svcVIP = netip.MustParseAddrPort("10.96.0.10:80")
	// svcL7VIP is the same Service's endpoints, opted in to L7.
	svcL7VIP = netip.MustParseAddrPort("10.96.0.12:80")
)

type pod struct {
	w       *proxy.Workload
	app     netip.AddrPort // the application's listener
	tunnel  uint16         // HBONE listener port (enrolled pods)
	plain   netip.AddrPort // inbound plaintext listener (enrolled pods)
	accepts atomic.Int32   // connections the application accepted
}

type fixture struct {
	t            testing.TB
	ca           *hbonetest.CA
	store        *hbonetest.Store
	tls          hbone.SPIFFETLS
	a, b1, b2, c *pod
	node1, node2 *proxy.Proxy
	pool1, pool2 *hbone.Pool
	outbound     netip.AddrPort // pod A's outbound listener
	dsts         dstTable
	policy       atomic.Pointer[proxy.Policy]
	strict       atomic.Bool  // node 2's policy refuses inbound plaintext as STRICT
	dials        atomic.Int32 // node 2 application dials
	appLns       []net.Listener
	obs1, obs2   *recorder
	wg           sync.WaitGroup
}

type fixtureOpts struct {
	flow hbone.FlowControl
	// app serves each accepted application connection (default echo).
	app func(net.Conn)
	// maxPlaintext is node 2's MaxInboundPlaintext (0: the default).
	maxPlaintext int
	// l7 is both nodes' L7 layer (nil: none).
	l7 proxy.L7
}

func newFixture(t testing.TB, o fixtureOpts) *fixture {
	t.Helper()
	ca, err := hbonetest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, ca: ca, store: &hbonetest.Store{}}
	f.tls = hbone.SPIFFETLS{SVID: f.store.Source, Bundles: ca.Bundle()}
	f.setPolicy(allowAll)
	if o.app == nil {
		o.app = echoConn
	}
	mk := func(ns, sa string, ip netip.Addr, enrolled bool) *pod {
		p := &pod{w: &proxy.Workload{Namespace: ns, Name: sa + "-pod", IPs: []netip.Addr{ip}}}
		if enrolled {
			p.w.Identity = ca.ID(ns, sa)
			svid, err := ca.SVID(p.w.Identity)
			if err != nil {
				t.Fatal(err)
			}
			f.store.Add(svid)
		}
		return p
	}
	f.a = mk("default", "a", ipA, true)
	f.b1 = mk("default", "b", ipB1, true)
	f.b2 = mk("default", "b", ipB2, true)
	f.c = mk("default", "c", ipC, false)
	for _, p := range []*pod{f.b1, f.b2, f.c} {
		p.app = f.serveApp(p, o.app)
	}

	newPool := func() *hbone.Pool {
		pool, err := hbone.NewPool(hbone.PoolConfig{TLS: f.tls, Flow: o.flow})
		if err != nil {
			t.Fatal(err)
		}
		return pool
	}
	f.pool1, f.pool2 = newPool(), newPool()
	policy := proxy.PolicyFunc(func(ctx context.Context, fl *proxy.Flow) proxy.Decision {
		return (*f.policy.Load()).Check(ctx, fl)
	})
	// Node 2 plays the policy engine's mTLS step: with strict set, inbound
	// plaintext is refused as STRICT before the rest of the policy.
	policy2 := proxy.PolicyFunc(func(ctx context.Context, fl *proxy.Flow) proxy.Decision {
		if f.strict.Load() && fl.Direction == proxy.Inbound && fl.Transport == proxy.TransportPlaintext {
			return proxy.Decision{Refusal: proxy.RefusedStrictMTLS, Reason: "mTLS mode is STRICT"}
		}
		return policy.Check(ctx, fl)
	})
	f.obs1, f.obs2 = &recorder{}, &recorder{}
	f.node1, err = proxy.New(proxy.Config{Resolver: proxy.ResolverFunc(f.resolve), Pool: f.pool1, ServerTLS: f.tls, Policy: policy, Observer: f.obs1, L7: o.l7})
	if err != nil {
		t.Fatal(err)
	}
	countingDialer := dialerFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
		f.dials.Add(1)
		if _, ok := proxy.FlowFromContext(ctx); !ok {
			return nil, errors.New("dial without a flow in its context")
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	})
	f.node2, err = proxy.New(proxy.Config{
		Resolver:  proxy.ResolverFunc(f.resolve),
		Pool:      f.pool2,
		ServerTLS: f.tls,
		Policy:    policy2,
		Dialer:    countingDialer,
		Observer:  f.obs2,
		HBONE:     hbone.ServerConfig{Flow: o.flow},

		MaxInboundPlaintext: o.maxPlaintext,
		L7:                  o.l7,
	})
	if err != nil {
		t.Fatal(err)
	}

	ln := listenOn(t, ipA)
	f.outbound = addrOf(ln)
	f.serve(func() error { return f.node1.ServeOutbound(context.Background(), ln, f.a.w, f.dsts.lookup) })
	for _, p := range []*pod{f.b1, f.b2} {
		hl := listenOn(t, p.w.IPs[0])
		p.tunnel = addrOf(hl).Port()
		f.serve(func() error { return f.node2.ServeInboundHBONE(context.Background(), hl, p.w) })
		pl := listenOn(t, p.w.IPs[0])
		p.plain = addrOf(pl)
		app := p.app
		f.serve(func() error {
			return f.node2.ServeInboundPlaintext(context.Background(), pl, p.w, func(net.Conn) (netip.AddrPort, error) { return app, nil })
		})
	}
	t.Cleanup(f.close)
	return f
}

func (f *fixture) serve(fn func() error) {
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		if err := fn(); err != nil && !errors.Is(err, proxy.ErrStopped) {
			f.t.Errorf("serve: %v", err)
		}
	}()
}

func (f *fixture) close() {
	f.node1.Close()
	f.node2.Close()
	f.pool1.Close()
	f.pool2.Close()
	for _, ln := range f.appLns {
		ln.Close()
	}
	f.wg.Wait()
}

func (f *fixture) setPolicy(p proxy.Policy) { f.policy.Store(&p) }

// allowAll allows every flow (a proxy has no default policy).
var allowAll = proxy.PolicyFunc(func(context.Context, *proxy.Flow) proxy.Decision {
	return proxy.Decision{Allow: true, Reason: "test allows all"}
})

// resolve knows the VIP and the pods; anything else is outside the mesh.
func (f *fixture) resolve(_ *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
	ep := func(p *pod) proxy.Endpoint {
		return proxy.Endpoint{Addr: p.app, Workload: p.w.String(), Enrolled: !p.w.Identity.IsZero(), Identity: p.w.Identity, TunnelPort: p.tunnel}
	}
	switch dst {
	case svcVIP:
		return proxy.Destination{Service: "default/b", Endpoints: []proxy.Endpoint{ep(f.b1), ep(f.b2)}}, nil
	case svcL7VIP:
		return proxy.Destination{Service: "default/b", Endpoints: []proxy.Endpoint{ep(f.b1), ep(f.b2)},
			L7: &proxy.L7Target{Namespace: "default", Name: "b", Port: 80}}, nil
	case netip.MustParseAddrPort("10.96.0.11:80"):
		return proxy.Destination{Service: "default/empty"}, nil
	}
	for _, p := range []*pod{f.b1, f.b2, f.c} {
		if dst == p.app {
			return proxy.Destination{Endpoints: []proxy.Endpoint{ep(p)}}, nil
		}
	}
	return proxy.Destination{Endpoints: []proxy.Endpoint{{Addr: dst}}}, nil
}

func (f *fixture) serveApp(p *pod, serve func(net.Conn)) netip.AddrPort {
	ln := listenOn(f.t, p.w.IPs[0])
	f.appLns = append(f.appLns, ln)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		var conns sync.WaitGroup
		defer conns.Wait()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.accepts.Add(1)
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return addrOf(ln)
}

// dial connects pod A to dst through the outbound listener, as capture
// would.
func (f *fixture) dial(dst netip.AddrPort) *net.TCPConn {
	f.t.Helper()
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.outbound))
	if err != nil {
		f.t.Fatal(err)
	}
	f.dsts.set(addrOf2(c.LocalAddr()), dst)
	c.SetDeadline(time.Now().Add(60 * time.Second))
	f.t.Cleanup(func() { c.Close() })
	return c
}

// dstTable plays the capture's original-destination lookup, keyed by the
// client's address. The client registers right after connect returns,
// which may be after the accept, so lookups wait for it.
type dstTable struct {
	mu sync.Mutex
	m  map[netip.AddrPort]*dstEntry
}

type dstEntry struct {
	ready chan struct{}
	dst   netip.AddrPort
}

func (d *dstTable) entry(src netip.AddrPort) *dstEntry {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.m == nil {
		d.m = make(map[netip.AddrPort]*dstEntry)
	}
	e := d.m[src]
	if e == nil {
		e = &dstEntry{ready: make(chan struct{})}
		d.m[src] = e
	}
	return e
}

func (d *dstTable) set(src, dst netip.AddrPort) {
	e := d.entry(src)
	e.dst = dst
	close(e.ready)
}

func (d *dstTable) lookup(c net.Conn) (netip.AddrPort, error) {
	src := addrOf2(c.RemoteAddr())
	e := d.entry(src)
	select {
	case <-e.ready:
	case <-time.After(10 * time.Second):
		return netip.AddrPort{}, errors.New("no original destination recorded")
	}
	d.mu.Lock()
	delete(d.m, src) // the client port may be reused later
	d.mu.Unlock()
	return e.dst, nil
}

type dialerFunc func(ctx context.Context, network, addr string) (net.Conn, error)

func (f dialerFunc) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return f(ctx, network, addr)
}

func listenOn(t testing.TB, ip netip.Addr) net.Listener {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func addrOf(ln net.Listener) netip.AddrPort { return addrOf2(ln.Addr()) }

func addrOf2(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

// echoConn echoes until EOF, then half-closes.
func echoConn(c net.Conn) {
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c)
}

var _ = spiffeid.ID{}

// recorder is an Observer that keeps every event.
type recorder struct {
	mu      sync.Mutex
	opened  []proxy.ConnInfo
	closed  []string // reasons
	bytes   []int64  // Sent+Received of closed connections
	refused []string // details
	reasons []proxy.RefusalReason
}

func (r *recorder) Opened(c *proxy.ConnInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.opened = append(r.opened, *c)
}

func (r *recorder) Closed(c *proxy.ConnInfo, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = append(r.closed, reason)
	r.bytes = append(r.bytes, c.Sent+c.Received)
}

func (r *recorder) Refused(f *proxy.Flow, why *proxy.Refusal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.refused = append(r.refused, why.Detail)
	r.reasons = append(r.reasons, why.Reason)
}

func (r *recorder) refusals() []proxy.RefusalReason {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]proxy.RefusalReason(nil), r.reasons...)
}

func (r *recorder) snapshot() (opened int, closed, refused []string, bytes []int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.opened), append([]string(nil), r.closed...), append([]string(nil), r.refused...), append([]int64(nil), r.bytes...)
}
