package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/examples"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
	"github.com/nodemesh/nodemesh/manifests"
)

// TestLabAdversarialIPv6 proves issue 14's item 6 against real agents: in a
// dual-stack lab (network.ipv6), with web pods that listen dual-stack as
// most programs do, every IPv6 path into an enrolled pod reaches the agent
// or is dropped. It covers the path that bypassed STRICT and a deny-all
// NetworkPolicy before the fix (the node's network namespace, which is
// where host-network pods and the kubelet sit, to the pod's link-local
// address over its veth), the pod's global IPv6 address from the node and
// from another pod, and the mesh itself over IPv6 as the positive control.
func TestLabAdversarialIPv6(t *testing.T) {
	sp, err := examples.TwoNodesSpec()
	if err != nil {
		t.Fatal(err)
	}
	sp.Network.IPv6 = true
	for i := range sp.Pods {
		if slices.Contains(sp.Pods[i].Command, "http") {
			sp.Pods[i].Command = append(sp.Pods[i].Command, "--network", "tcp")
		}
	}
	l := labtest.Up(t, sp)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	setMode(t, ctx, l, "shop", state.ModeEnabled) // the client namespace stays outside
	// The CRDs are there from the start, so the agents' informers for them
	// are part of the baseline below.
	dyn, err := dynamic.NewForConfig(l.Server.REST)
	if err != nil {
		t.Fatal(err)
	}
	crds, err := manifests.Render("../../manifests/crds")
	if err != nil {
		t.Fatal(err)
	}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Stop(context.Background()); err != nil {
			t.Errorf("stopping the mesh: %v", err)
		}
	})
	t.Cleanup(func() {
		for _, n := range []string{"node-1", "node-2"} {
			dumpLog(t, m.Agents[n].Log)
		}
	})
	node1, node2 := mustNode(t, l, "node-1"), mustNode(t, l, "node-2")
	web1, web2 := mustLabPod(t, l, "shop/web-1"), mustLabPod(t, l, "shop/web-2")
	client1 := mustLabPod(t, l, "client/client-1")
	for _, p := range []lab.Pod{web1, web2, client1} {
		if p.IP6 == "" {
			t.Fatalf("pod %s has no IPv6 address in a network.ipv6 lab", p.Key())
		}
	}
	web2LL := linkLocal(t, web2)
	t.Logf("web-2: %s, %s, %s on node-2's %s", web2.IP, web2.IP6, web2LL, web2.Link)
	url6 := func(p lab.Pod, path string) string {
		return "http://" + net.JoinHostPort(p.IP6, "8080") + "/" + path
	}
	get := func(from, url string) (workload.Reply, error) {
		r, out, err := demo.Get(ctx, l, from, url)
		if err != nil {
			return r, fmt.Errorf("%w: %s", err, out)
		}
		return r, nil
	}
	// fromNode dials addr from node's network namespace (the host network),
	// sends one HTTP request and reports what came back. The app answers
	// every request, so "data: HTTP/1.1 200" means it was reached.
	fromNode := func(n lab.Node, addr string) string {
		c, err := (&inpod.Dialer{Netns: n.Netns}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return "dial: " + errClass(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintf(c, "GET /from-node HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
			return "write: " + errClass(err)
		}
		b := make([]byte, 64)
		k, err := c.Read(b)
		if k > 0 {
			line, _, _ := strings.Cut(string(b[:k]), "\r\n")
			return "data: " + line
		}
		return "read: " + errClass(err)
	}
	web2LLAddr := net.JoinHostPort(web2LL+"%"+web2.Link, "8080")
	metrics := func(t *testing.T, n lab.Node) string {
		t.Helper()
		_, body, err := httpGet(nodeClient(n), "http://127.0.0.1:15020/metrics")
		if err != nil {
			t.Fatal(err)
		}
		return body
	}
	// wantDropped dials addr from node's namespace and requires that no
	// connection is made and that web-2's agent counts the sk_lookup drop:
	// SK_DROP fails the kernel's socket lookup, which answers the SYN with
	// a reset (refused); a timeout would be a drop on the way.
	wantDropped := func(t *testing.T, n lab.Node, addr string) {
		t.Helper()
		before := captureCounter(t, metrics(t, n), "lookup_unknown_dropped")
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		c, err := (&inpod.Dialer{Netns: n.Netns}).DialContext(cctx, "tcp", addr)
		if err == nil {
			c.Close()
			t.Fatalf("%s to %s: connected; want no connection", n.Name, addr)
		}
		if got := errClass(err); got != "refused" && got != "timeout" {
			t.Fatalf("%s to %s: %v; want refused or a timeout", n.Name, addr, err)
		}
		waitfor.NoError(t, 10*time.Second, "the drop counted", func() error {
			if after := captureCounter(t, metrics(t, n), "lookup_unknown_dropped"); after <= before {
				return fmt.Errorf("lookup_unknown_dropped %v -> %v: the connection was not dropped by sk_lookup", before, after)
			}
			return nil
		})
	}

	// Warm up (the pooled tunnel from node-1 to node-2 is part of the
	// baseline) before measuring it.
	waitfor.NoError(t, 30*time.Second, "web-1 to web-2 over IPv6 and IPv4", func() error {
		for _, u := range []string{url6(web2, "warm-up"), "http://" + web2.IP + ":8080/warm-up"} {
			if _, err := get(web1.Key(), u); err != nil {
				return err
			}
		}
		return nil
	})
	base := map[string]usageWithRSS{}
	for _, n := range []string{"node-1", "node-2"} {
		u, err := readUsageRSS(ctx, m, n)
		if err != nil {
			t.Fatal(err)
		}
		base[n] = u
	}

	t.Run("MeshOverIPv6", func(t *testing.T) {
		// Positive control: enrolled web-1 reaches web-2's IPv6 address
		// through both agents, and web-2 sees web-1's IPv6 address with the
		// agent's delivery mark. The request's marker never crosses the
		// underlay in plaintext.
		marker := fmt.Sprintf("NODEMESH-V6-%d", time.Now().UnixNano())
		sn := sniff(t, node1.Link)
		r, err := get(web1.Key(), url6(web2, marker))
		frames := sn.stop()
		if err != nil {
			t.Fatal(err)
		}
		if err := deliveredFrom(r, web2, web1.IP6); err != nil {
			t.Fatal(err)
		}
		if !tcp6PortSeen(frames, 15008) {
			t.Fatalf("no HBONE over IPv6 (port 15008) seen on %s in %d frames", node1.Link, len(frames))
		}
		if contains(frames, []byte(marker)) {
			t.Fatal("the marker crossed the underlay in plaintext between enrolled pods over IPv6")
		}
	})

	// watched runs an attack over IPv6 as a subtest with the underlay
	// captured throughout, and mesh requests over IPv6 both ways before and
	// after it, whose payload must not cross it in plaintext.
	routes6 := []route{{from: web1, to: web2, v6: true}, {from: web2, to: web1, v6: true}}
	watched := func(name string, fn func(t *testing.T)) {
		t.Run(name, func(t *testing.T) {
			w := watchUnderlay(t, ctx, l, node1.Link, routes6...)
			if n := w.meshTraffic(); n != len(routes6) {
				t.Errorf("mesh traffic over IPv6 before the attack: %d of %d requests answered", n, len(routes6))
			}
			fn(t)
			w.meshTraffic()
			w.check()
		})
	}

	watched("PlaintextOverIPv6ReachesTheAgent", func(t *testing.T) {
		// PERMISSIVE: client-1 (outside the mesh, on node-1) to web-2's
		// global IPv6 address is taken by web-2's agent and delivered from
		// client-1's IPv6 address, never straight to the app.
		r, err := get(client1.Key(), url6(web2, "plain-v6"))
		if err != nil {
			t.Fatal(err)
		}
		if err := deliveredFrom(r, web2, client1.IP6); err != nil {
			t.Fatal(err)
		}
	})

	watched("LinkLocalFromTheNodeIsDropped", func(t *testing.T) {
		// The path of the original finding: the node's namespace to the
		// pod's link-local address over its veth. Before the fix this
		// reached the app in plaintext with no policy applied. Now
		// sk_lookup drops it: the pod registers no link-local address, so
		// the lookup fails under every mode and the app never sees it.
		wantDropped(t, node2, web2LLAddr)
		// Another pod cannot even try: veths are point-to-point, so
		// web-2's link-local address is not on client-2's link.
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		out, err := l.Exec(ctx, "client/client-2", []string{exe, "-test.run=^TestAdversaryHelper$", "-test.count=1", "--",
			"probe", net.JoinHostPort(web2LL+"%eth0", "8080"), "http"})
		if got := strings.TrimSpace(string(out)); err != nil || !strings.HasPrefix(got, "dial: ") {
			t.Fatalf("client-2 to web-2's link-local address: %q (%v); want no connection", got, err)
		} else {
			t.Logf("client-2 to web-2's link-local address: %s", strings.SplitN(got, "\n", 2)[0])
		}
		// Control: the same namespace reaches an unenrolled pod's
		// link-local address (the veth path itself works), so the drop
		// above is the mesh's doing.
		client2 := mustLabPod(t, l, "client/client-2")
		addr := net.JoinHostPort(linkLocal(t, client2)+"%"+client2.Link, "8080")
		if got := fromNode(node2, addr); !strings.HasPrefix(got, "data: HTTP/1.1 200") {
			t.Fatalf("control: node-2 to unenrolled client-2 at %s: %s", addr, got)
		}
	})

	watched("AgentPortsOverIPv6AndLoopback", func(t *testing.T) {
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		probe := func(pod, addr, kind string) string {
			out, err := l.Exec(ctx, pod, []string{exe, "-test.run=^TestAdversaryHelper$", "-test.count=1", "--", "probe", addr, kind})
			if err != nil {
				t.Fatalf("probe %s from %s: %v (%s)", addr, pod, err, out)
			}
			return strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
		}
		// reset: steered to the agent, which resets it (the reset may
		// arrive before the probe's write).
		isReset := func(got string) bool { return got == "read: reset" || got == "write: reset" || got == "dial: reset" }
		for _, tc := range []struct{ pod, addr, kind, want string }{
			// From outside the mesh, the node's and the pod's IPv6 addresses.
			{client1.Key(), net.JoinHostPort(node2.IP6, "15020"), "http", "403 or refused"},
			{client1.Key(), net.JoinHostPort(node2.IP6, "15021"), "http", "403 or refused"},
			{client1.Key(), net.JoinHostPort(node2.IP6, "15000"), "http", "refused"},
			{client1.Key(), net.JoinHostPort(web2.IP6, "15006"), "plain", "reset"},
			{client1.Key(), net.JoinHostPort(web2.IP6, "15001"), "plain", "reset"},
			{client1.Key(), net.JoinHostPort(web2.IP6, "15020"), "plain", "reset"},
			{client1.Key(), net.JoinHostPort(web2.IP6, "15008"), "h2c", "no HTTP"},
			// From inside an enrolled pod: its own loopback reaches the
			// agent's in-pod listeners directly, with no original
			// destination; they reset it.
			{web1.Key(), "127.0.0.1:15001", "plain", "reset"},
			{web1.Key(), "[::1]:15001", "plain", "reset"},
			{web1.Key(), "127.0.0.1:15006", "plain", "reset"},
			{web1.Key(), "[::1]:15006", "plain", "reset"},
			// Its own IP on an agent port is the pod talking to itself:
			// sk_lookup lets it through, and nothing listens there.
			{web1.Key(), net.JoinHostPort(web1.IP6, "15006"), "plain", "reset or refused"},
			{web1.Key(), net.JoinHostPort(web1.IP, "15006"), "plain", "reset or refused"},
		} {
			got := probe(tc.pod, tc.addr, tc.kind)
			ok := false
			switch tc.want {
			case "403 or refused":
				ok = got == "data: HTTP/1.1 403 Forbidden" || got == "dial: refused"
			case "refused":
				ok = got == "dial: refused"
			case "reset":
				ok = isReset(got)
			case "reset or refused":
				ok = isReset(got) || got == "dial: refused"
			case "no HTTP":
				ok = !strings.HasPrefix(got, "data: HTTP")
			}
			if !ok {
				t.Errorf("%s to %s (%s): %q, want %s", tc.pod, tc.addr, tc.kind, got, tc.want)
			} else {
				t.Logf("%s to %s (%s): %s", tc.pod, tc.addr, tc.kind, got)
			}
		}
	})

	c := l.Server.Client
	watched("DenyAllNetworkPolicy", func(t *testing.T) {
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny-all", Namespace: "shop"},
			Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
		nps := c.NetworkingV1().NetworkPolicies("shop")
		if _, err := nps.Create(ctx, np, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = nps.Delete(context.Background(), np.Name, metav1.DeleteOptions{}) }()
		waitfor.NoError(t, 30*time.Second, "client-1 refused over IPv4 and IPv6", func() error {
			for _, u := range []string{"http://" + web2.IP + ":8080/deny4", url6(web2, "deny6")} {
				if r, err := get(client1.Key(), u); err == nil {
					return fmt.Errorf("%s still allowed: %+v", u, r)
				}
			}
			if !strings.Contains(metrics(t, node2), `nodemesh_connections_denied_total{direction="inbound",reason="policy"}`) {
				return fmt.Errorf("refused, but node-2 counted no policy denial")
			}
			return nil
		})
		// From the node to the pod's global IPv6 address: the pod's own
		// node, which NetworkPolicy always allows (kubelet's probes). The
		// agent counts every address of the node's own interfaces as the
		// node, so its IPv6 address passes as its IPv4 address does; it
		// goes through the agent (the delivery mark) and is not dropped
		// like the link-local path below.
		if got := fromNode(node2, net.JoinHostPort(web2.IP6, "8080")); !strings.HasPrefix(got, "data: HTTP/1.1 200") {
			t.Fatalf("node-2 to web-2's IPv6 address under deny-all: %s; want the app's answer (the pod's own node)", got)
		}
		wantDropped(t, node2, web2LLAddr)
	})

	watched("Strict", func(t *testing.T) {
		pa := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "security.nodemesh.io/v1alpha1", "kind": "PeerAuthentication",
			"metadata": map[string]any{"name": "strict", "namespace": "shop"},
			"spec":     map[string]any{"mtls": map[string]any{"mode": "STRICT"}},
		}}
		paRes := dyn.Resource(v1alpha1.PeerAuthenticationResource).Namespace("shop")
		waitfor.NoError(t, 60*time.Second, "PeerAuthentication created", func() error {
			_, err := paRes.Create(ctx, pa, metav1.CreateOptions{})
			return err
		})
		defer func() { _ = paRes.Delete(context.Background(), "strict", metav1.DeleteOptions{}) }()
		waitfor.NoError(t, 90*time.Second, "plaintext over IPv6 refused by STRICT at node-2", func() error {
			if r, err := get(client1.Key(), url6(web2, "strict6")); err == nil {
				return fmt.Errorf("plaintext over IPv6 still allowed: %+v", r)
			}
			if !strings.Contains(metrics(t, node2), `nodemesh_connections_denied_total{direction="inbound",reason="strict_mtls"}`) {
				return fmt.Errorf("refused, but not counted as STRICT")
			}
			return nil
		})
		if r, err := get(client1.Key(), "http://"+web2.IP+":8080/strict4"); err == nil {
			t.Fatalf("plaintext over IPv4 passed STRICT: %+v", r)
		}
		wantDropped(t, node2, web2LLAddr)
		// mTLS from the mesh still passes STRICT over IPv6.
		if r, err := get(web1.Key(), url6(web2, "strict-mtls6")); err != nil {
			t.Fatalf("mTLS over IPv6 to a STRICT pod: %v", err)
		} else if err := deliveredFrom(r, web2, web1.IP6); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("BackToBaseline", func(t *testing.T) {
		waitfor.NoError(t, time.Minute, "agents back at their baseline", func() error {
			for n, b := range base {
				u, err := readUsageRSS(ctx, m, n)
				if err != nil {
					return err
				}
				if err := u.backTo(b); err != nil {
					return fmt.Errorf("agent on %s %w", n, err)
				}
			}
			return nil
		})
		for n, b := range base {
			u, _ := readUsageRSS(ctx, m, n)
			t.Logf("%s: before %s, after %s", n, b, u)
		}
	})
}

// linkLocal returns the link-local address of a pod's eth0, waiting until
// the kernel has assigned it.
func linkLocal(t *testing.T, p lab.Pod) string {
	t.Helper()
	var ll string
	waitfor.NoError(t, 10*time.Second, "a link-local address on "+p.Key()+"'s eth0", func() error {
		return netns.Do(p.Netns, func() error {
			ifi, err := net.InterfaceByName("eth0")
			if err != nil {
				return err
			}
			addrs, err := ifi.Addrs()
			if err != nil {
				return err
			}
			for _, a := range addrs {
				if pfx, err := netip.ParsePrefix(a.String()); err == nil && pfx.Addr().Is6() && pfx.Addr().IsLinkLocalUnicast() {
					ll = pfx.Addr().String()
					return nil
				}
			}
			return fmt.Errorf("none among %v", addrs)
		})
	})
	return ll
}

// captureCounter returns the value of nodemesh_capture's counter name in
// an agent's metrics, or 0.
func captureCounter(t *testing.T, metrics, name string) float64 {
	t.Helper()
	for line := range strings.Lines(metrics) {
		if strings.HasPrefix(line, "#") || !strings.Contains(line, `"`+name+`"`) {
			continue
		}
		f := strings.Fields(line)
		var v float64
		if _, err := fmt.Sscan(f[len(f)-1], &v); err == nil {
			return v
		}
	}
	return 0
}
