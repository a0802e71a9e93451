package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/internal/leaktest"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

func TestMain(m *testing.M) {
	sweepNetns()
	leaktest.Main(m)
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// echoRoundTrip writes msg, half-closes, and checks the echo and the EOF.
func echoRoundTrip(t testing.TB, c *net.TCPConn, msg []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("writing: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo mismatch: sent %d bytes, got %d", len(msg), len(got))
	}
}

// ping writes and reads back a short message, leaving the connection open.
func ping(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("ping write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("ping read: %v", err)
	}
	if string(buf) != msg {
		t.Fatalf("ping: got %q, want %q", buf, msg)
	}
}

func expectReset(t testing.TB, c net.Conn, what string) {
	t.Helper()
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.ReadAll(c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s: read ended with %v, want connection reset", what, err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("%s: reset took %v", what, d)
	}
}

func TestOutboundHBONEToPod(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.dial(f.b1.app)
	ping(t, c, "hello")

	out := f.node1.Connections()
	if len(out) != 1 || out[0].Flow.Transport != proxy.TransportHBONE || out[0].Flow.DstIdentity != f.b1.w.Identity ||
		out[0].Flow.Direction != proxy.Outbound || out[0].Flow.Dst != f.b1.app {
		t.Fatalf("node 1 connections: %+v", out)
	}
	in := f.node2.Connections()
	if len(in) != 1 || in[0].Flow.SrcIdentity != f.a.w.Identity || in[0].Flow.Direction != proxy.Inbound ||
		in[0].Flow.Src.Addr() != ipA || in[0].Flow.Dst != f.b1.app {
		t.Fatalf("node 2 connections: %+v", in)
	}
	echoRoundTrip(t, c, randomBytes(t, 2<<20+3))
	waitfor.True(t, 20*time.Second, "connections to be untracked", func() bool {
		return len(f.node1.Connections()) == 0 && len(f.node2.Connections()) == 0
	})
	if st := f.pool1.Stats(); st.Handshakes != 1 {
		t.Fatalf("pool: %+v", st)
	}
	// A second connection reuses the tunnel.
	c2 := f.dial(f.b1.app)
	echoRoundTrip(t, c2, []byte("second"))
	if st := f.pool1.Stats(); st.Handshakes != 1 || st.Hits != 1 {
		t.Fatalf("pool after second connection: %+v, want no new handshake", st)
	}
}

func TestServiceBalancing(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	const n = 20
	for i := range n {
		c := f.dial(svcVIP)
		ping(t, c, "x") // the endpoint is chosen and counted once this returns
		_ = i
	}
	b1, b2 := f.b1.accepts.Load(), f.b2.accepts.Load()
	if b1+b2 != n || b1 < n/2-1 || b2 < n/2-1 {
		t.Fatalf("%d held connections spread %d/%d over two endpoints; power of two choices should balance them", n, b1, b2)
	}
	for _, ci := range f.node1.Connections() {
		if ci.Flow.Service != "default/b" || ci.Flow.OrigDst != svcVIP {
			t.Fatalf("flow lost its service: %+v", ci.Flow)
		}
	}
}

func TestPassthroughToNonEnrolledAndHalfClose(t *testing.T) {
	// The application speaks first, half-closes, and then still reads:
	// passthrough preserves half-close both ways.
	got := make(chan []byte, 1)
	app := func(c net.Conn) {
		c.Write([]byte("banner"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		got <- b
	}
	f := newFixture(t, fixtureOpts{app: app})
	c := f.dial(f.c.app)
	banner, err := io.ReadAll(c)
	if err != nil || string(banner) != "banner" {
		t.Fatalf("read %q, %v; want the banner then EOF", banner, err)
	}
	if _, err := c.Write([]byte("after server half-close")); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	select {
	case b := <-got:
		if string(b) != "after server half-close" {
			t.Fatalf("application read %q", b)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("application never saw the client's bytes and EOF")
	}
	ci := f.node1.Connections()
	for _, x := range ci {
		if x.Flow.Transport != proxy.TransportPlaintext {
			t.Fatalf("non-enrolled destination used %v", x.Flow.Transport)
		}
	}
	if st := f.pool1.Stats(); st.Handshakes != 0 {
		t.Fatalf("passthrough opened a tunnel: %+v", st)
	}
}

func TestHBONEHalfClose(t *testing.T) {
	// Client half-closes first: the application sees EOF and can still
	// answer (request/response protocols that delimit by FIN).
	app := func(c net.Conn) {
		b, _ := io.ReadAll(c)
		c.Write(append([]byte("got:"), b...))
		c.(*net.TCPConn).CloseWrite()
	}
	f := newFixture(t, fixtureOpts{app: app})
	c := f.dial(f.b1.app)
	c.Write([]byte("request"))
	c.CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "got:request" {
		t.Fatalf("read %q, %v", b, err)
	}

	// Server half-closes first: the client reads everything, then EOF.
	f2 := newFixture(t, fixtureOpts{app: func(c net.Conn) {
		c.Write([]byte("banner"))
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
	}})
	c2 := f2.dial(f2.b1.app)
	b, err = io.ReadAll(c2)
	if err != nil || string(b) != "banner" {
		t.Fatalf("read %q, %v; want banner then EOF", b, err)
	}
}

func TestOutboundFailuresResetQuickly(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	dead := listenOn(t, ipB1)
	deadAddr := addrOf(dead)
	dead.Close()

	// An enrolled endpoint whose HBONE port is closed.
	f.b2.tunnel = deadAddr.Port()
	expectReset(t, f.dial(f.b2.app), "HBONE peer down")
	// A Service without endpoints.
	expectReset(t, f.dial(netip.MustParseAddrPort("10.96.0.11:80")), "no endpoints")
	// A plaintext destination that refuses.
	expectReset(t, f.dial(deadAddr), "passthrough refused")
	// Capture loop.
	expectReset(t, f.dial(netip.AddrPortFrom(ipA, proxy.PortOutbound)), "capture loop")
	// Egress denied.
	f.setPolicy(proxy.PolicyFunc(func(_ context.Context, fl *proxy.Flow) proxy.Decision {
		return proxy.Decision{Allow: fl.Direction != proxy.Outbound, Reason: "test denies egress"}
	}))
	expectReset(t, f.dial(f.b1.app), "egress denied")
	// Ingress denied at the destination: 401 there, reset here.
	f.setPolicy(proxy.PolicyFunc(func(_ context.Context, fl *proxy.Flow) proxy.Decision {
		return proxy.Decision{Allow: fl.Direction != proxy.Inbound, Reason: "test denies ingress"}
	}))
	expectReset(t, f.dial(f.b1.app), "ingress denied")

	// Each failure is reported with its typed reason (the report follows
	// the reset, so wait for all of them; their order may vary).
	waitfor.True(t, 20*time.Second, "six refusals on node 1", func() bool { return len(f.obs1.refusals()) == 6 })
	got := f.obs1.refusals()
	slices.Sort(got)
	want := []proxy.RefusalReason{proxy.RefusedPolicy, proxy.RefusedNoEndpoints, proxy.RefusedInvalid,
		proxy.FailedDial, proxy.FailedTunnel, proxy.FailedTunnel}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("refusal reasons %v, want %v", got, want)
	}
}

func TestInboundRefusals(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	key := hbone.Key{Src: f.a.w.Identity, Dst: f.b1.w.Identity, Addr: netip.AddrPortFrom(ipB1, f.b1.tunnel)}
	connect := func(target netip.AddrPort) error {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		s, err := f.pool1.Connect(ctx, hbone.ConnectRequest{Key: key, Target: target})
		if err == nil {
			s.Close()
		}
		return err
	}
	status := func(err error) int {
		var ce *hbone.ConnectError
		if errors.As(err, &ce) {
			return ce.Status
		}
		t.Fatalf("want a ConnectError, got %v", err)
		return 0
	}
	if got := status(connect(f.b2.app)); got != http.StatusBadRequest {
		t.Errorf("CONNECT to another pod's IP: status %d, want 400", got)
	}
	if got := status(connect(netip.AddrPortFrom(ipB1, proxy.PortAdmin))); got != http.StatusBadRequest {
		t.Errorf("CONNECT to an agent port: status %d, want 400", got)
	}
	if n := f.dials.Load(); n != 0 {
		t.Fatalf("node 2 dialed %d times for refused CONNECTs", n)
	}
	dead := listenOn(t, ipB1)
	deadAddr := addrOf(dead)
	dead.Close()
	if got := status(connect(deadAddr)); got != http.StatusServiceUnavailable {
		t.Errorf("CONNECT to a closed application port: status %d, want 503", got)
	}
	f.setPolicy(proxy.PolicyFunc(func(context.Context, *proxy.Flow) proxy.Decision { return proxy.Decision{Reason: "deny all"} }))
	if got := status(connect(f.b1.app)); got != http.StatusUnauthorized {
		t.Errorf("CONNECT denied by policy: status %d, want 401", got)
	}
}

func TestInboundPlaintextModes(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	dialPlain := func() *net.TCPConn {
		c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.b1.plain))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	echoRoundTrip(t, dialPlain(), []byte("permissive"))
	f.strict.Store(true)
	before := f.b1.accepts.Load()
	// The reset may come before connect(2) returns on loopback.
	if c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.b1.plain)); err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("dial in STRICT mode: %v, want success or connection reset", err)
		}
	} else {
		defer c.Close()
		expectReset(t, c, "plaintext in STRICT mode")
	}
	if f.b1.accepts.Load() != before {
		t.Fatal("STRICT mode let plaintext reach the application")
	}
	waitfor.True(t, 20*time.Second, "the STRICT refusal to be reported", func() bool { return len(f.obs2.refusals()) == 1 })
	if got := f.obs2.refusals(); got[0] != proxy.RefusedStrictMTLS {
		t.Fatalf("refusal reason %v, want %v", got, proxy.RefusedStrictMTLS)
	}
}

// TestInboundPlaintextPerPodLimit: any pod can open plaintext connections
// to an enrolled pod's 15006; beyond MaxInboundPlaintext open ones new
// connections are reset and counted, and a closed one frees its place.
func TestInboundPlaintextPerPodLimit(t *testing.T) {
	f := newFixture(t, fixtureOpts{maxPlaintext: 3})
	dialPlain := func() *net.TCPConn {
		c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.b1.plain))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	var held []*net.TCPConn
	for i := range 3 {
		c := dialPlain()
		ping(t, c, fmt.Sprintf("held %d", i)) // established through the agent, left open
		held = append(held, c)
	}
	if c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.b1.plain)); err == nil {
		defer c.Close()
		expectReset(t, c, "fourth plaintext connection to a pod with a limit of 3")
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("fourth dial: %v", err)
	}
	// The refusal is reported after the reset, which the client may see
	// first.
	waitfor.True(t, 30*time.Second, "the refusal to be reported", func() bool { return len(f.obs2.refusals()) > 0 })
	if got := f.obs2.refusals(); len(got) != 1 || got[0] != proxy.RefusedLimit {
		t.Fatalf("refusals %v, want one %s", got, proxy.RefusedLimit)
	}
	// Another pod's budget is its own.
	c2, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.b2.plain))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	echoRoundTrip(t, c2, []byte("other pod"))
	held[0].Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.b1.plain))
		if err == nil {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			_, werr := c.Write([]byte("x"))
			buf := make([]byte, 1)
			_, rerr := io.ReadFull(c, buf)
			c.Close()
			if werr == nil && rerr == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("closing a held connection did not free its place")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReevaluateAndCloseConnections(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	keep := f.dial(f.b1.app)
	ping(t, keep, "keep")
	victim := f.dial(f.b2.app)
	ping(t, victim, "victim")
	f.setPolicy(proxy.PolicyFunc(func(_ context.Context, fl *proxy.Flow) proxy.Decision {
		return proxy.Decision{Allow: fl.Dst != f.b2.app, Reason: "b2 now denied"}
	}))
	if n := f.node1.Reevaluate(context.Background()); n != 1 {
		t.Fatalf("Reevaluate closed %d connections on node 1, want 1", n)
	}
	expectReset(t, victim, "connection denied on re-evaluation")
	ping(t, keep, "still allowed")
	n := f.node2.CloseConnections(func(ci proxy.ConnInfo) bool { return ci.Flow.Dst == f.b1.app })
	if n != 1 {
		t.Fatalf("CloseConnections closed %d, want 1", n)
	}
	keep.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadAll(keep); err == nil {
		t.Fatal("connection closed at the destination ended cleanly, want an error")
	}
}

func TestDrain(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.dial(f.b1.app)
	ping(t, c, "before")
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		drained <- f.node1.Drain(ctx)
	}()
	// New connections are refused once the listener is closed.
	waitfor.True(t, 20*time.Second, "outbound listener closed", func() bool {
		c, err := net.Dial("tcp", f.outbound.String())
		if err != nil {
			return true
		}
		c.Close()
		return false
	})
	ping(t, c, "during drain")
	select {
	case err := <-drained:
		t.Fatalf("Drain returned %v with a connection open", err)
	default:
	}
	echoRoundTrip(t, c, []byte("last words"))
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("Drain: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Drain did not return after the last connection ended")
	}
}

func TestDrainDeadlineResets(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.dial(f.b1.app)
	ping(t, c, "x")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := f.node2.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain past its deadline: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadAll(c); err == nil {
		t.Fatal("connection cut by the drain deadline ended cleanly")
	}
}

func TestConcurrentConnections(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dst := []netip.AddrPort{svcVIP, f.b1.app, f.c.app}[i%3]
			c := f.dial(dst)
			echoRoundTrip(t, c, randomBytes(t, 100<<10))
		}()
	}
	wg.Wait()
}

func TestConfigValidation(t *testing.T) {
	if _, err := proxy.New(proxy.Config{}); err == nil {
		t.Fatal("New with an empty config succeeded")
	}
	f := newFixture(t, fixtureOpts{})
	// A proxy without a policy must not default to allowing everything.
	if _, err := proxy.New(proxy.Config{Resolver: proxy.ResolverFunc(f.resolve), Pool: f.pool1, ServerTLS: f.tls}); err == nil {
		t.Fatal("New without a Policy succeeded")
	}
	ln := listenOn(t, ipA)
	if err := f.node1.ServeOutbound(context.Background(), ln, &proxy.Workload{Name: "x"}, f.dsts.lookup); err == nil {
		t.Fatal("ServeOutbound for a workload without identity succeeded")
	}
}

func TestObserverEvents(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.dial(f.b1.app)
	echoRoundTrip(t, c, []byte("0123456789"))
	waitfor.True(t, 20*time.Second, "both ends to report the close", func() bool {
		_, c1, _, _ := f.obs1.snapshot()
		_, c2, _, _ := f.obs2.snapshot()
		return len(c1) == 1 && len(c2) == 1
	})
	for i, r := range []*recorder{f.obs1, f.obs2} {
		opened, closed, refused, bytes := r.snapshot()
		if opened != 1 || closed[0] != proxy.CloseEOF || len(refused) != 0 || bytes[0] != 20 {
			t.Fatalf("node %d: opened %d, closed %v, refused %v, bytes %v; want 1 opened, eof, 20 bytes", i+1, opened, closed, refused, bytes)
		}
	}

	victim := f.dial(f.b1.app)
	ping(t, victim, "v")
	f.setPolicy(proxy.PolicyFunc(func(context.Context, *proxy.Flow) proxy.Decision { return proxy.Decision{Reason: "locked down"} }))
	f.node1.Reevaluate(context.Background())
	expectReset(t, victim, "re-evaluated connection")
	expectReset(t, f.dial(f.b1.app), "denied connection")
	waitfor.True(t, 20*time.Second, "policy close and refusal", func() bool {
		_, closed, refused, _ := f.obs1.snapshot()
		return len(closed) == 2 && len(refused) == 1
	})
	_, closed, refused, _ := f.obs1.snapshot()
	if closed[1] != proxy.ClosePolicy || refused[0] != "denied: locked down" {
		t.Fatalf("closed %v, refused %v", closed, refused)
	}
	if got := f.obs1.refusals(); got[0] != proxy.RefusedPolicy {
		t.Fatalf("refusal reason %v, want %v", got, proxy.RefusedPolicy)
	}
}

func TestListenerGoneTunnelsContinue(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	// A separate HBONE listener for pod B1 whose context we cancel, as
	// when the pod's listeners are torn down.
	ln := listenOn(t, ipB1)
	ctx, cancel := context.WithCancel(context.Background())
	f.serve(func() error { return f.node2.ServeInboundHBONE(ctx, ln, f.b1.w) })
	f.b1.tunnel = addrOf(ln).Port()
	c := f.dial(f.b1.app)
	ping(t, c, "before")
	cancel()
	waitfor.True(t, 20*time.Second, "listener closed", func() bool {
		c, err := net.Dial("tcp", addrOf(ln).String())
		if err != nil {
			return true
		}
		c.Close()
		return false
	})
	ping(t, c, "open tunnel survives its listener")
	echoRoundTrip(t, c, []byte("bye"))
}

func TestConnInfoJSON(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.dial(f.b1.app)
	ping(t, c, "x")
	b, err := json.Marshal(f.node1.Connections())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"Direction":"outbound"`, `"Transport":"hbone"`, `"DstIdentity":"spiffe://cluster.local/ns/default/sa/b"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON listing lacks %s: %s", want, b)
		}
	}
}
