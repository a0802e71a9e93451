package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/hbone/hbonetest"
	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

const netnsPrefix = "nmtproxy-"

// sweepNetns deletes namespaces left by killed runs (nmtproxy-<pid>-*,
// <pid> gone).
func sweepNetns() {
	if os.Geteuid() != 0 {
		return
	}
	ents, err := os.ReadDir("/var/run/netns")
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), netnsPrefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		if pid, err := strconv.Atoi(pidStr); err == nil {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
				exec.Command("ip", "netns", "del", e.Name()).Run()
			}
		}
	}
}

// podPair creates two pod namespaces joined by a veth pair, with ipA and
// ipB on either end, and returns their paths.
func podPair(t *testing.T, ipA, ipB netip.Addr) (string, string) {
	t.Helper()
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	var paths []string
	for _, n := range []string{"a", "b"} {
		ns := fmt.Sprintf("%s%d-%s", netnsPrefix, os.Getpid(), n)
		exec.Command("ip", "netns", "del", ns).Run()
		run("netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		run("-n", ns, "link", "set", "lo", "up")
		paths = append(paths, ns)
	}
	a, b := paths[0], paths[1]
	run("-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
	run("-n", a, "addr", "add", ipA.String()+"/24", "dev", "eth0", "nodad")
	run("-n", b, "addr", "add", ipB.String()+"/24", "dev", "eth0", "nodad")
	run("-n", a, "link", "set", "eth0", "up")
	run("-n", b, "link", "set", "eth0", "up")
	return "/var/run/netns/" + a, "/var/run/netns/" + b
}

// nsDialer adapts inpod.Dialer to proxy.Dialer and hbone.DialFunc.
func nsDialer(ns string) dialerFunc {
	d := &inpod.Dialer{Netns: ns}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// TestPrivTunnelBetweenPodNamespaces runs the data path with every socket
// where the agent would put it: the outbound listener on 127.0.0.1:15001
// in pod A's namespace, the HBONE listener on pod B's IP in pod B's
// namespace, the tunnel dialled from inside pod A's namespace across a
// veth pair, and the application dialled inside pod B's namespace.
func TestPrivTunnelBetweenPodNamespaces(t *testing.T) {
	privtest.Root(t)
	ipA, ipB := netip.MustParseAddr("10.231.0.1"), netip.MustParseAddr("10.231.0.2")
	nsA, nsB := podPair(t, ipA, ipB)
	ctx := context.Background()

	ca, err := hbonetest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	store := &hbonetest.Store{}
	wa := &proxy.Workload{Namespace: "default", Name: "a", Identity: ca.ID("default", "a"), IPs: []netip.Addr{ipA}, Netns: nsA}
	wb := &proxy.Workload{Namespace: "default", Name: "b", Identity: ca.ID("default", "b"), IPs: []netip.Addr{ipB}, Netns: nsB}
	for _, w := range []*proxy.Workload{wa, wb} {
		svid, err := ca.SVID(w.Identity)
		if err != nil {
			t.Fatal(err)
		}
		store.Add(svid)
	}
	tlsP := hbone.SPIFFETLS{SVID: store.Source, Bundles: ca.Bundle()}

	// Pod B's application: an echo server on its pod IP.
	appAddr := netip.AddrPortFrom(ipB, 8080)
	appLn, err := inpod.ListenTCP(ctx, nsB, "tcp", appAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer appLn.Close()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := appLn.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				echoConn(c)
			}()
		}
	}()

	// One pool and one dialer per node, as the agent has: the namespace to
	// dial from comes with each call.
	poolDial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		key, ok := hbone.KeyFromContext(ctx)
		if !ok || key.SrcNetns == "" {
			return nil, fmt.Errorf("tunnel dial without a source namespace")
		}
		return nsDialer(key.SrcNetns)(ctx, network, addr)
	}
	appDial := dialerFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
		f, ok := proxy.FlowFromContext(ctx)
		if !ok || f.Workload.Netns == "" {
			return nil, fmt.Errorf("dial without a flow")
		}
		return nsDialer(f.Workload.Netns)(ctx, network, addr)
	})
	pool, err := hbone.NewPool(hbone.PoolConfig{TLS: tlsP, Dial: poolDial})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	resolve := proxy.ResolverFunc(func(_ *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
		if dst.Addr() == ipB {
			return proxy.Destination{Endpoints: []proxy.Endpoint{{Addr: dst, Workload: "default/b", Enrolled: true, Identity: wb.Identity}}}, nil
		}
		return proxy.Destination{Endpoints: []proxy.Endpoint{{Addr: dst}}}, nil
	})
	newProxy := func(d proxy.Dialer) *proxy.Proxy {
		p, err := proxy.New(proxy.Config{Resolver: resolve, Pool: pool, ServerTLS: tlsP, Dialer: d, Policy: allowAll})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	node1, node2 := newProxy(appDial), newProxy(appDial)
	defer node2.Close()
	defer node1.Close()

	outLn, err := inpod.ListenTCP(ctx, nsA, "tcp", "127.0.0.1:15001")
	if err != nil {
		t.Fatal(err)
	}
	hboneLn, err := inpod.ListenTCP(ctx, nsB, "tcp", netip.AddrPortFrom(ipB, hbone.Port).String())
	if err != nil {
		t.Fatal(err)
	}
	var dsts dstTable
	serveCtx, stop := context.WithCancel(ctx)
	defer stop()
	wg.Add(2)
	go func() {
		defer wg.Done()
		node1.ServeOutbound(serveCtx, outLn, wa, dsts.lookup)
	}()
	go func() {
		defer wg.Done()
		node2.ServeInboundHBONE(serveCtx, hboneLn, wb)
	}()

	// Pod A's application connects to B; capture would redirect it to
	// 15001, which we do by dialling 15001 inside A's namespace.
	c, err := (&inpod.Dialer{Netns: nsA}).DialContext(ctx, "tcp", "127.0.0.1:15001")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dsts.set(netip.MustParseAddrPort(c.LocalAddr().String()), appAddr)
	c.SetDeadline(time.Now().Add(60 * time.Second))
	ping(t, c, "across namespaces")
	if st := pool.Stats(); st.Conns != 1 || st.Handshakes != 1 {
		t.Fatalf("pool: %+v", st)
	}
	in := node2.Connections()
	if len(in) != 1 || in[0].Flow.Src.Addr() != ipA || in[0].Flow.SrcIdentity != wa.Identity || in[0].Flow.Dst != appAddr {
		t.Fatalf("destination agent saw %+v; want source %s (%s) to %s", in, ipA, wa.Identity, appAddr)
	}
	msg := make([]byte, 1<<20)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	echoRoundTrip(t, c, msg)

	// A CONNECT naming pod A's IP arrives at pod B: refused, nothing dialled.
	ctx2, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = pool.Connect(ctx2, hbone.ConnectRequest{
		Key:    hbone.Key{Src: wa.Identity, Dst: wb.Identity, Addr: netip.AddrPortFrom(ipB, hbone.Port), SrcNetns: nsA},
		Target: netip.AddrPortFrom(ipA, 8080),
	})
	if err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("CONNECT to another pod's IP: %v, want 400", err)
	}
	// Plaintext to pod B's HBONE port from pod A's namespace is refused.
	raw, err := (&inpod.Dialer{Netns: nsA}).DialContext(ctx, "tcp", netip.AddrPortFrom(ipB, hbone.Port).String())
	if err != nil {
		t.Fatal(err)
	}
	raw.SetDeadline(time.Now().Add(20 * time.Second))
	raw.Write([]byte("GET / HTTP/1.1\r\nHost: b\r\n\r\n"))
	if got, _ := io.ReadAll(raw); strings.Contains(string(got), "HTTP/") {
		t.Fatalf("plaintext to 15008 got an HTTP answer: %q", got)
	}
	raw.Close()
	stop()
}
