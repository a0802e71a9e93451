package redirect

import (
	"context"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

// nodeDial connects from the node's namespace (kubelet, a host-network
// pod) to addr, sends a line and returns the first reply line, or the
// error prefixed "error: ".
func nodeDial(t *testing.T, tp *topo, addr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	d := inpod.Dialer{Netns: "/var/run/netns/" + tp.node}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	line, err := exchangeLine(c, "probe", 3*time.Second)
	if err != nil {
		return "error: " + err.Error()
	}
	return line
}

// TestPrivNodeProbesWhileAgentDown: kubelet's probes of an enrolled pod
// must not fail while the node's agent restarts. With the agent serving, a
// connection from the node to the pod's probe port goes through the agent
// (where it is logged and judged); with the agent gone and capture still
// pinned, it reaches the pod's application directly, on both families,
// while the node's connections to other ports and every connection from
// another pod are still refused (fail closed). A new agent that adopts the
// pins keeps the node's addresses and the probe ports, and takes the
// node's connections back once it serves the pod again.
func TestPrivNodeProbesWhileAgentDown(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	b, c := tp.pod("b"), tp.pod("c")
	app := serveLines(t, listenIn(t, b, "tcp", "[::]:8080"), "APPB")
	other := serveLines(t, listenIn(t, b, "tcp", "[::]:9090"), "OTHER")
	node4, node6 := netip.MustParseAddr("10.211.0.1"), netip.MustParseAddr("fd00:211::1")
	pod := Pod{Name: b.name, Netns: b.netns, Cgroup: b.cgroup, IPs: b.ips(), NodeProbePorts: []uint16{8080, 15006, 0}}

	capt1, err := Load(context.Background(), tp.config())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { capt1.Close() }) // a no-op once released
	// What the agent passes: every address of the node's interfaces; the
	// link-local and loopback ones are left out.
	if _, err := capt1.SetNodeAddrs([]netip.Addr{node4, node6, netip.MustParseAddr("fe80::1"), netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("169.254.7.127")}); err != nil {
		t.Fatal(err)
	}
	if got, err := capt1.NodeAddrs(); err != nil || !slices.Equal(got, []netip.Addr{node4, node6}) {
		t.Fatalf("node addresses %v (%v), want %v and %v", got, err, node4, node6)
	}
	ep, err := capt1.Enroll(context.Background(), pod)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ep.NodeProbePorts, []uint16{8080}) {
		t.Errorf("probe ports %v, want [8080] (agent ports and 0 dropped)", ep.NodeProbePorts)
	}
	stop := agentServe(t, capt1, ep)

	// Agent up: the node's probes go through the agent like everything else.
	for _, addr := range []string{"10.211.0.2:8080", "[fd00:211::2]:8080"} {
		if got := nodeDial(t, tp, addr); !strings.HasPrefix(got, "INBOUND local="+addr+" remote=") {
			t.Errorf("agent up, node to %s: %q, want it through the agent (INBOUND)", addr, got)
		}
	}
	if n := app.count(); n != 0 {
		t.Fatalf("agent up: the app received %d connections around the agent", n)
	}

	// Agent gone (its listeners closed, every pin left in place).
	stop()
	if err := capt1.Release(); err != nil {
		t.Fatal(err)
	}
	before := lookupStatPinned(t, tp)
	for _, tc := range []struct{ addr, want string }{
		{"10.211.0.2:8080", "APPB local=10.211.0.2:8080 remote=10.211.0.1:"},
		{"[fd00:211::2]:8080", "APPB local=[fd00:211::2]:8080 remote=[fd00:211::1]:"},
	} {
		if got := nodeDial(t, tp, tc.addr); !strings.HasPrefix(got, tc.want) {
			t.Errorf("agent down, node to the probe port %s: %q, want %q", tc.addr, got, tc.want)
		}
	}
	for _, addr := range []string{"10.211.0.2:9090", "[fd00:211::2]:9090"} {
		if got := nodeDial(t, tp, addr); !strings.HasPrefix(got, "error:") {
			t.Errorf("agent down, node to %s (not a probe port): %q, want no connection", addr, got)
		}
	}
	for _, addr := range []string{"10.211.0.2:8080", "[fd00:211::2]:8080", "10.211.0.2:9090"} {
		if r := appDial(t, c, "tcp", addr, "x"); r.Err == "" || !strings.Contains(r.Err, "refused") {
			t.Errorf("agent down, another pod to %s: reply %q err %q; want connection refused", addr, r.Reply, r.Err)
		}
	}
	if n := app.count(); n != 2 {
		t.Errorf("agent down: the app received %d connections, want the node's 2 probes", n)
	}
	if n := other.count(); n != 0 {
		t.Errorf("agent down: port 9090 received %d connections around the agent", n)
	}
	if got := lookupStatPinned(t, tp); got < before+2 {
		t.Errorf("lookup_node_passed %d -> %d, want the 2 probes counted", before, got)
	}

	// A new agent adopts the pins: the probes keep passing until it
	// serves the pod again, then go through it.
	capt2 := loadCaptureT(t, tp.config())
	if got, err := capt2.NodeAddrs(); err != nil || !slices.Equal(got, []netip.Addr{node4, node6}) {
		t.Errorf("adopted node addresses %v (%v), want %v and %v", got, err, node4, node6)
	}
	if got := nodeDial(t, tp, "10.211.0.2:8080"); !strings.HasPrefix(got, "APPB ") {
		t.Errorf("adopted, not re-enrolled, node to the probe port: %q, want the app", got)
	}
	ep2, err := capt2.Enroll(context.Background(), pod)
	if err != nil {
		t.Fatal(err)
	}
	agentServe(t, capt2, ep2)
	served := app.count()
	for _, addr := range []string{"10.211.0.2:8080", "[fd00:211::2]:8080"} {
		if got := nodeDial(t, tp, addr); !strings.HasPrefix(got, "INBOUND local="+addr) {
			t.Errorf("agent back, node to %s: %q, want it through the agent", addr, got)
		}
	}
	if n := app.count(); n != served {
		t.Errorf("agent back: the app received %d connections around the agent", n-served)
	}
	// Unenrolling removes the pod's probe ports; uninstall (Close, by the
	// cleanup) removes the node's addresses with every other map.
	if err := capt2.Unenroll(ep2); err != nil {
		t.Fatal(err)
	}
	var k capturePortKey
	var v uint8
	it := capt2.objs.NodeProbePorts.Iterate()
	for it.Next(&k, &v) {
		t.Errorf("probe port %d of netns %d left after unenroll", k.Port, k.Netns)
	}
}

// lookupStatPinned reads lookup_node_passed from the pinned map, for a
// moment when no agent holds it.
func lookupStatPinned(t *testing.T, tp *topo) uint64 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(tp.pinDir, "maps", captureMapLookupStats), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var per []uint64
	if err := m.Lookup(uint32(2), &per); err != nil { // LSTAT_NODE_PASSED
		t.Fatal(err)
	}
	var sum uint64
	for _, v := range per {
		sum += v
	}
	return sum
}
