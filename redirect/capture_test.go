package redirect

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

func loadCaptureT(t *testing.T, cfg Config) *Capture {
	t.Helper()
	c, err := Load(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func enrollT(t *testing.T, c *Capture, p *testPod, exclude ...uint16) *EnrolledPod {
	t.Helper()
	ep, err := c.Enroll(context.Background(), Pod{Name: p.name, Netns: p.netns, Cgroup: p.cgroup, IPs: p.ips(), ExcludeOutboundPorts: exclude})
	if err != nil {
		t.Fatal(err)
	}
	return ep
}

// udpEcho answers every datagram in the pod with "UDP <payload>".
func udpEcho(t *testing.T, p *testPod, addr string) {
	var pc net.PacketConn
	if err := inpod.Do(p.netns, func() error {
		var err error
		pc, err = net.ListenPacket("udp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(append([]byte("UDP "), buf[:n]...), from)
		}
	}()
}

func wantPrefix(t *testing.T, what string, r dialResult, prefix string) {
	t.Helper()
	if r.Err != "" || !strings.HasPrefix(r.Reply, prefix) {
		t.Errorf("%s: got reply %q err %q (peer %s); want reply starting %q", what, r.Reply, r.Err, r.Remote, prefix)
	}
}

func TestPrivOutboundCapture(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a, b, c := tp.pod("a"), tp.pod("b"), tp.pod("c")
	capt := loadCaptureT(t, tp.config())
	for _, port := range []string{"8080", "5432", "15021"} {
		serveLines(t, listenIn(t, b, "tcp", ":"+port), "SERVER")
	}
	serveLines(t, listenIn(t, a, "tcp", ":9090"), "APPA")
	serveLines(t, listenIn(t, a, "tcp4", "127.0.0.1:7070"), "LOOP")
	udpEcho(t, b, ":8081")
	ep := enrollT(t, capt, a, 5432)
	agentServe(t, capt, ep)

	tests := []struct {
		name, from, network, addr, want, wantPeer string
	}{
		{"v4 to another pod", "a", "tcp", "10.211.0.3:8080",
			"AGENT dst=10.211.0.3:8080 | SERVER local=10.211.0.3:8080 remote=10.211.0.2:", "127.0.0.1:15001"},
		{"v6 to another pod", "a", "tcp", "[fd00:211::3]:8080",
			"AGENT dst=[fd00:211::3]:8080 | SERVER local=[fd00:211::3]:8080 remote=[fd00:211::2]:", "[::1]:15001"},
		{"within the pod's namespace", "a", "tcp", "10.211.0.2:9090",
			"AGENT dst=10.211.0.2:9090 | APPA local=10.211.0.2:9090 remote=10.211.0.2:", "127.0.0.1:15001"},
		{"dual-stack socket to a v4-mapped address", "a", "mapped", "10.211.0.3:8080",
			"AGENT dst=10.211.0.3:8080 | SERVER local=10.211.0.3:8080 remote=10.211.0.2:", "127.0.0.1:15001"},
		{"excluded port", "a", "tcp", "10.211.0.3:5432",
			"SERVER local=10.211.0.3:5432 remote=10.211.0.2:", "10.211.0.3:5432"},
		{"loopback", "a", "tcp", "127.0.0.1:7070",
			"LOOP local=127.0.0.1:7070", "127.0.0.1:7070"},
		{"agent port", "a", "tcp", "10.211.0.3:15021",
			"SERVER local=10.211.0.3:15021 remote=10.211.0.2:", "10.211.0.3:15021"},
		{"UDP", "a", "udp", "10.211.0.3:8081", "UDP udp", "10.211.0.3:8081"},
		{"non-enrolled pod on the same node", "c", "tcp", "10.211.0.3:8080",
			"SERVER local=10.211.0.3:8080 remote=10.211.0.4:", "10.211.0.3:8080"},
		{"non-enrolled pod v6", "c", "tcp", "[fd00:211::3]:8080",
			"SERVER local=[fd00:211::3]:8080 remote=[fd00:211::4]:", "[fd00:211::3]:8080"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r dialResult
			if tt.network == "mapped" {
				r = helperRun(t, tp.pods[tt.from], "dialmapped", "NMTCAP_ADDR="+tt.addr, "NMTCAP_MSG=mapped")
			} else {
				r = appDial(t, tp.pods[tt.from], tt.network, tt.addr, tt.network)
			}
			wantPrefix(t, tt.name, r, tt.want)
			if r.Remote != tt.wantPeer {
				t.Errorf("app saw peer %s, want %s", r.Remote, tt.wantPeer)
			}
		})
	}
	_ = c
	if err := ep.SelfCheck(context.Background()); err != nil {
		t.Errorf("self-check of an enrolled, served pod: %v", err)
	}
	st, err := capt.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st["connect_captured"] < 4 || st["connect_excluded"] < 3 {
		t.Errorf("stats %v: want >= 4 captured (3 app + probes) and >= 3 excluded connects", st)
	}
}

func TestPrivInboundSteering(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	b, c := tp.pod("b"), tp.pod("c")
	capt := loadCaptureT(t, tp.config())
	app := serveLines(t, listenIn(t, b, "tcp", ":8080"), "APPB")
	ep := enrollT(t, capt, b)
	agentServe(t, capt, ep)

	wantPrefix(t, "v4 inbound", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "INBOUND local=10.211.0.2:8080 remote=10.211.0.3:")
	wantPrefix(t, "v6 inbound", appDial(t, c, "tcp", "[fd00:211::2]:8080", "x"), "INBOUND local=[fd00:211::2]:8080 remote=[fd00:211::3]:")
	wantPrefix(t, "port without app", appDial(t, c, "tcp", "10.211.0.2:9999", "x"), "INBOUND local=10.211.0.2:9999")
	wantPrefix(t, "HBONE", appDial(t, c, "tcp", "10.211.0.2:15008", "x"), "HBONE local=10.211.0.2:15008")
	wantPrefix(t, "HBONE v6", appDial(t, c, "tcp", "[fd00:211::2]:15008", "x"), "HBONE local=[fd00:211::2]:15008")
	if n := app.count(); n != 0 {
		t.Errorf("the app received %d connections around the agent", n)
	}
	if err := capt.Unenroll(ep); err != nil {
		t.Fatal(err)
	}
	wantPrefix(t, "after unenroll", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "APPB local=10.211.0.2:8080 remote=10.211.0.3:")
	wantPrefix(t, "after unenroll v6", appDial(t, c, "tcp", "[fd00:211::2]:8080", "x"), "APPB local=[fd00:211::2]:8080")
}

// TestPrivInboundEveryAddress: every local address of an enrolled pod
// reaches the agent or nothing (issue 14, item 6). The pod's registered
// IPv4 and IPv6 addresses are steered to 15006; its IPv6 link-local
// address, an extra IPv6 address and a secondary IPv4 address the agent
// was not told about are dropped, from another pod on the same L2 segment
// and from the node, where a host-network pod's connection comes from.
func TestPrivInboundEveryAddress(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	b, c := tp.pod("b"), tp.pod("c")
	nsB := filepath.Base(b.netns)
	run(t, "ip", "-n", nsB, "addr", "add", "fd00:211::99/64", "dev", "eth0", "nodad")
	run(t, "ip", "-n", nsB, "addr", "add", "10.211.0.99/24", "dev", "eth0")
	ll := linkLocal(t, nsB, "eth0")
	capt := loadCaptureT(t, tp.config())
	// A dual-stack application on every address, as in the issue.
	app := serveLines(t, listenIn(t, b, "tcp", "[::]:8080"), "APPB")
	ep := enrollT(t, capt, b)
	agentServe(t, capt, ep)

	wantPrefix(t, "v4", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "INBOUND local=10.211.0.2:8080")
	wantPrefix(t, "v6 global", appDial(t, c, "tcp", "[fd00:211::2]:8080", "x"), "INBOUND local=[fd00:211::2]:8080")
	before := lookupStat(t, capt, "lookup_unknown_dropped")
	for _, addr := range []string{"[" + ll.String() + "%eth0]:8080", "[fd00:211::99]:8080", "10.211.0.99:8080"} {
		if r := appDial(t, c, "tcp", addr, "x"); r.Err == "" || r.Reply != "" {
			t.Errorf("from another pod to %s: reply %q err %q; want no connection", addr, r.Reply, r.Err)
		}
	}
	// From the node: a host-network pod's path to the pod's link-local
	// address over the node's side of the link.
	nodeDial := inpod.Dialer{Netns: "/var/run/netns/" + tp.node}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if conn, err := nodeDial.DialContext(ctx, "tcp", "["+ll.String()+"%br0]:8080"); err == nil {
		conn.Close()
		t.Errorf("from the node to [%s%%br0]:8080: connected around the agent", ll)
	}
	if n := app.count(); n != 0 {
		t.Errorf("the app received %d connections around the agent", n)
	}
	if got := lookupStat(t, capt, "lookup_unknown_dropped"); got <= before {
		t.Errorf("lookup_unknown_dropped %d -> %d: the drops were not counted", before, got)
	}
	// The pod still reaches itself over loopback.
	wantPrefix(t, "pod to itself, loopback", appDial(t, b, "tcp", "127.0.0.1:8080", "x"), "APPB")
}

// TestPrivInboundExcludedPorts: ports excluded with
// nodemesh.io/exclude-inbound-ports reach the application directly, on
// both families, and are steered again once the exclusion is lifted
// (issue 14, item 5).
func TestPrivInboundExcludedPorts(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	b, c := tp.pod("b"), tp.pod("c")
	capt := loadCaptureT(t, tp.config())
	serveLines(t, listenIn(t, b, "tcp", "[::]:8080"), "APPB")
	serveLines(t, listenIn(t, b, "tcp", "[::]:9090"), "APPB9090")
	enroll := func(in ...uint16) *EnrolledPod {
		t.Helper()
		ep, err := capt.Enroll(context.Background(), Pod{Name: b.name, Netns: b.netns, Cgroup: b.cgroup, IPs: b.ips(), ExcludeInboundPorts: in})
		if err != nil {
			t.Fatal(err)
		}
		return ep
	}
	ep := enroll(8080)
	agentServe(t, capt, ep)
	wantPrefix(t, "excluded v4", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "APPB local=10.211.0.2:8080 remote=10.211.0.3:")
	wantPrefix(t, "excluded v6", appDial(t, c, "tcp", "[fd00:211::2]:8080", "x"), "APPB local=[fd00:211::2]:8080")
	wantPrefix(t, "not excluded", appDial(t, c, "tcp", "10.211.0.2:9090", "x"), "INBOUND local=10.211.0.2:9090")
	if lookupStat(t, capt, "lookup_excluded") < 2 {
		t.Errorf("excluded inbound connections not counted")
	}
	enroll(9090) // updated in place
	wantPrefix(t, "exclusion moved: 8080 steered", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "INBOUND local=10.211.0.2:8080")
	wantPrefix(t, "exclusion moved: 9090 direct", appDial(t, c, "tcp", "10.211.0.2:9090", "x"), "APPB9090")
	enroll()
	wantPrefix(t, "exclusion lifted", appDial(t, c, "tcp", "10.211.0.2:9090", "x"), "INBOUND local=10.211.0.2:9090")
	for _, bad := range []uint16{15008, 15006, ProbePort} {
		if _, err := capt.Enroll(context.Background(), Pod{Name: b.name, Netns: b.netns, IPs: b.ips(), ExcludeInboundPorts: []uint16{bad}}); err == nil {
			t.Errorf("excluding inbound port %d was accepted", bad)
		}
	}
}

// linkLocal returns the IPv6 link-local address of dev in netns ns.
func linkLocal(t *testing.T, ns, dev string) netip.Addr {
	t.Helper()
	out, err := exec.Command("ip", "-n", ns, "-6", "-o", "addr", "show", "dev", dev, "scope", "link").Output()
	if err != nil {
		t.Fatalf("reading the link-local address of %s in %s: %v", dev, ns, err)
	}
	for _, f := range strings.Fields(string(out)) {
		if pfx, err := netip.ParsePrefix(f); err == nil && pfx.Addr().IsLinkLocalUnicast() {
			return pfx.Addr()
		}
	}
	t.Fatalf("no IPv6 link-local address on %s in %s: %q", dev, ns, out)
	return netip.Addr{}
}

func lookupStat(t *testing.T, c *Capture, name string) uint64 {
	t.Helper()
	st, err := c.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st[name]
}

func TestPrivEnrollAtRuntime(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a, b := tp.pod("a"), tp.pod("b")
	capt := loadCaptureT(t, tp.config())
	serveLines(t, listenIn(t, b, "tcp", ":8080"), "SERVER")
	const dst = "10.211.0.3:8080"

	wantPrefix(t, "before enrolling", appDial(t, a, "tcp", dst, "x"), "SERVER")
	ep := enrollT(t, capt, a)
	agentServe(t, capt, ep)
	wantPrefix(t, "enrolled", appDial(t, a, "tcp", dst, "x"), "AGENT dst="+dst)
	if st := capt.Status(); len(st.Pods) != 1 || st.Pods[0].Verified || st.Pods[0].Error == "" {
		t.Errorf("status before the self-check %+v: want one pod, not verified, with a reason", st)
	}
	if err := ep.SelfCheck(context.Background()); err != nil {
		t.Errorf("self-check: %v", err)
	}
	if st := capt.Status(); len(st.Pods) != 1 || !st.Pods[0].Verified || st.Pods[0].Name != "a" {
		t.Errorf("status after the self-check %+v: want pod a verified", st)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(capt.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			got[key] = m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	podKey := fmt.Sprintf("nodemesh_capture_pod_verified,netns_cookie=%d,pod=a", ep.Cookie)
	if got[podKey] != 1 || got["nodemesh_capture_events_total,event=connect_captured"] < 1 {
		t.Errorf("metrics %v: want %s = 1 and captured connects counted", got, podKey)
	}
	// Re-enrolling with a new exclusion replaces listeners and settings.
	if ep2 := enrollT(t, capt, a, 8080); ep2 != ep {
		t.Error("enrolling a served pod again did not return its EnrolledPod")
	}
	wantPrefix(t, "port excluded at runtime", appDial(t, a, "tcp", dst, "x"), "SERVER")
	ep3 := enrollT(t, capt, a)
	wantPrefix(t, "exclusion lifted", appDial(t, a, "tcp", dst, "x"), "AGENT dst="+dst)

	if err := capt.Unenroll(ep3); err != nil {
		t.Fatal(err)
	}
	wantPrefix(t, "unenrolled", appDial(t, a, "tcp", dst, "x"), "SERVER")
	if err := ep3.SelfCheck(context.Background()); err == nil {
		t.Error("self-check passed for an unenrolled pod")
	} else {
		t.Logf("self-check of an unenrolled pod fails as it must: %v", err)
	}
	if err := capt.Unenroll(ep3); err == nil {
		t.Error("second Unenroll of the same pod succeeded")
	}
}

// TestPrivSelfCheckDetectsUnservedCapture: enrolled but nobody accepts on
// 15001 -- the pod must not be reported as captured.
func TestPrivSelfCheckDetectsUnservedCapture(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a := tp.pod("a")
	capt := loadCaptureT(t, tp.config())
	ep := enrollT(t, capt, a)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := ep.SelfCheck(ctx); err == nil {
		t.Fatal("self-check passed without an accept loop on 15001")
	}
	if ok, _, err := ep.Verified(); ok || err == nil {
		t.Errorf("Verified() = %v, %v after a failed self-check", ok, err)
	}
}

// ownerProcess starts a child that loads capture with the topology's pins
// and enrolls p, and returns it once it serves.
func ownerProcess(t *testing.T, tp *topo, p *testPod) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), helperEnv+"=owner", "NMTCAP_ROOT="+tp.root, "NMTCAP_PIN="+tp.pinDir,
		"NMTCAP_AGENTCG="+agentCgroup, "NMTCAP_NETNS="+p.netns, "NMTCAP_IPS="+p.ip4.String()+" "+p.ip6.String())
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if !strings.HasPrefix(line, "READY") {
		t.Fatalf("capture owner: %q %v", line, err)
	}
	return cmd
}

type objectIDs struct {
	progs []ebpf.ProgramID
	maps  []ebpf.MapID
	links []link.ID
}

func (c *Capture) objectIDs(t *testing.T) objectIDs {
	t.Helper()
	var ids objectIDs
	for _, p := range []*ebpf.Program{c.objs.NmConnect4, c.objs.NmConnect6, c.objs.NmSockops, c.objs.NmSkmsg, c.objs.NmSklookup} {
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids.progs = append(ids.progs, id)
	}
	for _, m := range c.allMaps() {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids.maps = append(ids.maps, id)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ls := []link.Link{}
	for _, l := range c.links {
		ls = append(ls, l)
	}
	for _, p := range c.pods {
		if p.link != nil {
			ls = append(ls, p.link)
		}
	}
	for _, l := range ls {
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids.links = append(ids.links, info.ID)
	}
	return ids
}

// waitGone waits until none of the objects exist in the kernel any more
// (freeing is asynchronous) and fails the test otherwise.
func waitGone(t *testing.T, ids objectIDs) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var left []string
		for _, id := range ids.progs {
			if p, err := ebpf.NewProgramFromID(id); err == nil {
				p.Close()
				left = append(left, fmt.Sprintf("program %d", id))
			}
		}
		for _, id := range ids.maps {
			if m, err := ebpf.NewMapFromID(id); err == nil {
				m.Close()
				left = append(left, fmt.Sprintf("map %d", id))
			}
		}
		for _, id := range ids.links {
			if l, err := link.NewFromID(id); err == nil {
				l.Close()
				left = append(left, fmt.Sprintf("link %d", id))
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left in the kernel after Close: %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func attachedAt(t *testing.T, cgroup string) int {
	t.Helper()
	n := 0
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect, ebpf.AttachCGroupSockOps} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: cgroupFD(t, cgroup), Attach: typ})
		if err != nil {
			t.Fatalf("querying %s: %v", cgroup, err)
		}
		n += len(res.Programs)
	}
	return n
}

func cgroupFD(t *testing.T, path string) int {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func TestPrivFailClosedReadoptAndCleanup(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a, b, c := tp.pod("a"), tp.pod("b"), tp.pod("c")
	server := serveLines(t, listenIn(t, b, "tcp", ":8080"), "SERVER")
	appA := serveLines(t, listenIn(t, a, "tcp", ":8080"), "APPA")
	const dst, dst6 = "10.211.0.3:8080", "[fd00:211::3]:8080"

	owner := ownerProcess(t, tp, a)
	wantPrefix(t, "captured by the owner", appDial(t, a, "tcp", dst, "x"), "AGENT dst="+dst)
	wantPrefix(t, "inbound via the owner", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "INBOUND")
	served := server.count()

	// SIGKILL: no Close, no Release; only the pins remain.
	if err := owner.Process.Signal(unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	owner.Wait()
	for _, addr := range []string{dst, dst6} {
		r := appDial(t, a, "tcp", addr, "x")
		if r.Err == "" || !strings.Contains(r.Err, "refused") {
			t.Errorf("outbound to %s with the agent killed: reply %q err %q; want connection refused", addr, r.Reply, r.Err)
		}
	}
	for _, addr := range []string{"10.211.0.2:8080", "[fd00:211::2]:8080"} {
		r := appDial(t, c, "tcp", addr, "x")
		if r.Err == "" || !strings.Contains(r.Err, "refused") {
			t.Errorf("inbound to %s with the agent killed: reply %q err %q; want connection refused", addr, r.Reply, r.Err)
		}
	}
	if n := server.count(); n != served {
		t.Errorf("the destination received %d connections while the agent was dead", n-served)
	}
	if n := appA.count(); n != 0 {
		t.Errorf("the enrolled pod's app received %d inbound connections around the agent", n)
	}

	// A new agent adopts the pinned state.
	capt, err := Load(context.Background(), tp.config())
	if err != nil {
		t.Fatal(err)
	}
	defer capt.Close()
	if !capt.Adopted() {
		t.Error("Load did not report adopting the pinned objects")
	}
	adopted := capt.AdoptedPods()
	if len(adopted) != 1 || len(adopted[0].IPs) != 2 {
		t.Fatalf("adopted pods %+v, want the one enrolled pod with 2 IPs", adopted)
	}
	if st := capt.Status(); !st.Adopted || len(st.Pods) != 1 || st.Pods[0].Verified {
		t.Errorf("status after adoption %+v: want adopted, one unverified pod", st)
	}
	r := appDial(t, a, "tcp", dst, "x")
	if !strings.Contains(r.Err, "refused") {
		t.Errorf("adopted but not re-enrolled: reply %q err %q; want still refused", r.Reply, r.Err)
	}
	ep := enrollT(t, capt, a)
	if ep.Cookie != adopted[0].Cookie {
		t.Errorf("re-enrolled cookie %d, adopted %d", ep.Cookie, adopted[0].Cookie)
	}
	agentServe(t, capt, ep)
	if n := len(capt.AdoptedPods()); n != 0 {
		t.Errorf("%d adopted pods left after re-enrolling", n)
	}
	wantPrefix(t, "captured after adoption", appDial(t, a, "tcp", dst, "x"), "AGENT dst="+dst)
	wantPrefix(t, "inbound after adoption", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "INBOUND")

	// Uninstall: nothing may remain, and the pod gets plain networking.
	ids := capt.objectIDs(t)
	if err := capt.Close(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, ids)
	if _, err := os.Stat(tp.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory %s still exists: %v", tp.pinDir, err)
	}
	if n := attachedAt(t, tp.root); n != 0 {
		t.Errorf("%d programs still attached at the capture root", n)
	}
	if n := attachedAt(t, agentCgroup); n != 0 {
		t.Errorf("%d programs still attached at the agent cgroup", n)
	}
	wantPrefix(t, "after uninstall", appDial(t, a, "tcp", dst, "x"), "SERVER local="+dst)
	wantPrefix(t, "inbound after uninstall", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "APPA")
}

// TestPrivRestartNoGap restarts the capture owner (Release, then Load and
// Enroll again) while the pod's app keeps connecting: every attempt must be
// captured or refused, none may reach the destination uncaptured.
func TestPrivRestartNoGap(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a, b := tp.pod("a"), tp.pod("b")
	serveLines(t, listenIn(t, b, "tcp", ":8080"), "SERVER")
	capt1, err := Load(context.Background(), tp.config())
	if err != nil {
		t.Fatal(err)
	}
	stop1 := agentServe(t, capt1, enrollT(t, capt1, a))

	loop := helperCmd(t, a, "dialloop", "NMTCAP_ADDR=10.211.0.3:8080")
	stdin, _ := loop.StdinPipe()
	var out strings.Builder
	loop.Stdout = &out
	if err := loop.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	stop1()
	if err := capt1.Release(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // agent down
	capt2 := loadCaptureT(t, tp.config())
	agentServe(t, capt2, enrollT(t, capt2, a))
	time.Sleep(300 * time.Millisecond)
	stdin.Close()
	if err := loop.Wait(); err != nil {
		t.Fatal(err)
	}
	var res loopResult
	if err := jsonUnmarshal(out.String(), &res); err != nil {
		t.Fatal(err)
	}
	t.Logf("connect attempts during the restart: %+v", res)
	if res.Direct != 0 || len(res.Other) != 0 {
		t.Errorf("%d connections escaped capture during the restart (%v)", res.Direct, res.Other)
	}
	if res.Captured == 0 || res.Failed == 0 {
		t.Errorf("want both captured (agent up) and refused (agent down) attempts, got %+v", res)
	}
}

func TestPrivAccel(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a := tp.pod("a")

	// Auto: on only if every self-test check passes, including splice(2).
	auto := loadCaptureT(t, tp.config())
	on, why := auto.Accel()
	t.Logf("same-node acceleration (auto): on=%v reason=%q", on, why)
	if !on {
		if why == "" {
			t.Error("acceleration off without a reason")
		}
		if err := auto.SetAccel(true); err == nil {
			t.Error("SetAccel(true) accepted after the self-test failed")
		}
	}
	if err := auto.Close(); err != nil {
		t.Fatal(err)
	}

	// Force: the redirect itself must work on kernels with sockmap.
	cfg := tp.config()
	cfg.Accel = AccelForce
	capt := loadCaptureT(t, cfg)
	if on, why := capt.Accel(); !on {
		t.Fatalf("acceleration (forced) off: %s", why)
	}
	agentServe(t, capt, enrollT(t, capt, a))
	for _, accel := range []bool{true, false} {
		if err := capt.SetAccel(accel); err != nil {
			t.Fatal(err)
		}
		before, _ := capt.Stats()
		for _, size := range []string{"1", "65536", "3000000"} {
			for _, addr := range []string{"10.211.0.9:7777", "[fd00:211::9]:7777"} {
				r := helperRun(t, a, "bulk", "NMTCAP_ADDR="+addr, "NMTCAP_SIZE="+size)
				if r.Err != "" {
					t.Errorf("accel=%v %s bytes to %s: %s", accel, size, addr, r.Err)
				}
			}
		}
		after, _ := capt.Stats()
		redirected := after["msg_redirected"] - before["msg_redirected"]
		if accel && redirected == 0 {
			t.Errorf("acceleration on, but sk_msg redirected nothing (%v)", after)
		}
		if !accel && redirected != 0 {
			t.Errorf("acceleration off, but sk_msg redirected %d messages", redirected)
		}
	}
}

func helperRun(t *testing.T, p *testPod, mode string, env ...string) dialResult {
	t.Helper()
	out, err := helperCmd(t, p, mode, env...).Output()
	if err != nil {
		t.Fatalf("helper %s: %v (%s)", mode, err, out)
	}
	var r dialResult
	if err := jsonUnmarshal(string(out), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestPrivEnrollFailureLeavesPodUntouched: a failed Enroll must not leave
// the pod half captured (for example inbound steered to a listener that
// is gone, which would drop its traffic).
func TestPrivEnrollFailureLeavesPodUntouched(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a, b, c := tp.pod("a"), tp.pod("b"), tp.pod("c")
	capt := loadCaptureT(t, tp.config())
	serveLines(t, listenIn(t, a, "tcp", ":8080"), "APPA")
	serveLines(t, listenIn(t, b, "tcp", ":8080"), "SERVER")
	untouched := func(when string) {
		t.Helper()
		wantPrefix(t, when+": inbound", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "APPA local=10.211.0.2:8080")
		wantPrefix(t, when+": outbound", appDial(t, a, "tcp", "10.211.0.3:8080", "x"), "SERVER local=10.211.0.3:8080")
	}

	// 1. Something in the pod already listens on 15001.
	squat := listenIn(t, a, "tcp4", "127.0.0.1:15001")
	_, err := capt.Enroll(context.Background(), Pod{Name: "a", Netns: a.netns, Cgroup: a.cgroup, IPs: a.ips()})
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("Enroll with 15001 taken: %v, want address already in use", err)
	}
	squat.Close()
	untouched("15001 taken")

	// 2. A failure late in Enroll (the sk_lookup pin path is occupied),
	// after the inbound map was written: everything must be rolled back.
	cookie, err := inpod.Cookie(a.netns)
	if err != nil {
		t.Fatal(err)
	}
	blocker, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	pin := tp.pinDir + "/pods/" + cookieName(cookie)
	if err := blocker.Pin(pin); err != nil {
		t.Fatal(err)
	}
	_, err = capt.Enroll(context.Background(), Pod{Name: "a", Netns: a.netns, Cgroup: a.cgroup, IPs: a.ips()})
	if err == nil {
		t.Fatal("Enroll succeeded with its pin path occupied")
	}
	t.Logf("late Enroll failure (expected): %v", err)
	untouched("late failure")
	if st := capt.Status(); len(st.Pods) != 0 {
		t.Errorf("a failed Enroll left pods in the status: %+v", st.Pods)
	}
	// Nothing may remain in the maps either: a restarted agent would adopt it.
	for name, m := range map[string]*ebpf.Map{"inbound": capt.objs.Inbound, "enrolled": capt.objs.Enrolled} {
		var k, v []byte
		n, it := 0, m.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		if n != 0 {
			t.Errorf("a failed Enroll left %d entries in %s", n, name)
		}
	}
	blocker.Unpin()

	// 3. Cgroup outside the capture root is refused up front.
	if _, err := capt.Enroll(context.Background(), Pod{Name: "a", Netns: a.netns, Cgroup: agentCgroup, IPs: a.ips()}); err == nil {
		t.Error("Enroll accepted a pod cgroup outside the capture root")
	}
	// Finally it works.
	ep := enrollT(t, capt, a)
	agentServe(t, capt, ep)
	wantPrefix(t, "enrolled", appDial(t, a, "tcp", "10.211.0.3:8080", "x"), "AGENT")
}
