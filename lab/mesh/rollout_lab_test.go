package mesh_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/spec"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
	"github.com/nodemesh/nodemesh/manifests"
	"github.com/nodemesh/nodemesh/redirect"
)

// Three nodes, the agent on node-1 and node-2 only; enrolled pods on all
// three, an unenrolled one on node-3.
const partialRolloutSpec = `
apiVersion: lab.nodemesh.io/v1alpha1
kind: Lab
network:
  underlay: 10.250.0.0/24
  clusterCIDR: 10.244.0.0/16
nodes:
  - name: node-1
  - name: node-2
  - name: node-3
namespaces:
  - name: shop
    labels: {nodemesh.io/mode: enabled}
  - name: client
    labels: {nodemesh.io/mode: enabled}
  - name: outside
pods:
  - {name: client-1, namespace: client, node: node-1, serviceAccount: client, labels: {app: client}, command: [nodemeshctl, lab, workload, http, --port, "8080"]}
  - {name: web-2, namespace: shop, node: node-2, serviceAccount: web, labels: {app: web}, command: [nodemeshctl, lab, workload, http, --port, "8080"], ports: [{name: http, containerPort: 8080}]}
  - {name: web-3, namespace: shop, node: node-3, serviceAccount: web, labels: {app: web}, command: [nodemeshctl, lab, workload, http, --port, "8080"], ports: [{name: http, containerPort: 8080}]}
  - {name: outsider-3, namespace: outside, node: node-3, serviceAccount: outsider, labels: {app: outsider}, command: [nodemeshctl, lab, workload, http, --port, "8080"]}
`

type rolloutDump struct {
	Synced bool `json:"synced"`
	Marks  []struct {
		Node  string `json:"node"`
		Fresh bool   `json:"meshCapable"`
	} `json:"marks"`
	Unprotected []string `json:"unprotectedPods"`
}

// TestLabPartialRollout: agents on two of three nodes. Enrolled to enrolled
// with agents goes over HBONE; to an enrolled pod on the node without an
// agent it is plaintext passthrough while PERMISSIVE and refused at the
// source once STRICT; the status dump lists the unprotected pod; an agent
// killed with SIGKILL stops being a tunnel endpoint once its mark expires,
// and its pods fail closed.
func TestLabPartialRollout(t *testing.T) {
	sp, err := spec.Parse("partial-rollout.yaml", []byte(partialRolloutSpec))
	if err != nil {
		t.Fatal(err)
	}
	l := labtest.Up(t, sp)
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	if _, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin, AgentNodes: []string{"node-1", "node-4"}}); err == nil {
		t.Fatal("Start with an agent node that does not exist succeeded")
	}
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin, AgentNodes: []string{"node-1", "node-2"},
		MarkDuration: 10 * time.Second, MarkRenew: 3 * time.Second}) // the SIGKILL step waits for node-2's mark to expire
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			for _, a := range m.Agents {
				if b, err := os.ReadFile(a.Log); err == nil {
					t.Logf("agent on %s:\n%s", a.Node, tail(string(b), 60))
				}
			}
		}
		_ = m.Stop(context.WithoutCancel(ctx))
	}()
	if len(m.Agents) != 2 || m.Agents["node-3"] != nil {
		t.Fatalf("agents on %v, want node-1 and node-2", m.Agents)
	}
	pod := func(key string) lab.Pod {
		p, err := l.Pod(key)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	client1, web2, web3, outsider3 := pod("client/client-1"), pod("shop/web-2"), pod("shop/web-3"), pod("outside/outsider-3")
	get := func(from lab.Pod, to lab.Pod, path string) (workload.Reply, error) {
		r, out, err := demo.Get(ctx, l, from.Key(), fmt.Sprintf("http://%s:8080/%s", to.IP, path))
		if err != nil {
			return r, fmt.Errorf("GET %s from %s: %w (%s)", to.Key(), from.Key(), err, strings.TrimSpace(string(out)))
		}
		return r, nil
	}
	// seenFrom checks who answered, which source address it saw (the
	// client's own: agents deliver transparently) and whether the
	// destination agent delivered it (its delivery mark on the server's
	// socket; demo.CheckDelivered, which knows what kernels before 5.17
	// do instead) or the connection arrived directly.
	seenFrom := func(r workload.Reply, to lab.Pod, src string, viaAgent bool) error {
		if viaAgent {
			return demo.CheckDelivered(r, to.Key(), src)
		}
		h, _, _ := net.SplitHostPort(r.Remote)
		if r.Pod != to.Key() || h != src {
			return fmt.Errorf("reply %+v: want %s seeing %s", r, to.Key(), src)
		}
		if got := r.Mark == redirect.DefaultDeliverMark; got != viaAgent {
			return fmt.Errorf("reply %+v: delivered by the agent %v (mark %#x), want %v", r, got, r.Mark, viaAgent)
		}
		return nil
	}
	dumpOf := func(node string) (rolloutDump, error) {
		var d rolloutDump
		b, err := m.Get(ctx, node, "/config_dump/rollout")
		if err != nil {
			return d, err
		}
		return d, json.Unmarshal(b, &d)
	}
	fresh := func(d rolloutDump, node string) bool {
		return slices.ContainsFunc(d.Marks, func(x struct {
			Node  string `json:"node"`
			Fresh bool   `json:"meshCapable"`
		}) bool {
			return x.Node == node && x.Fresh
		})
	}

	// Both agents marked; node-3 has no mark and web-3 is unprotected.
	waitfor.NoError(t, 60*time.Second, "node marks seen by node-1", func() error {
		d, err := dumpOf("node-1")
		if err != nil {
			return err
		}
		if !d.Synced || !fresh(d, "node-1") || !fresh(d, "node-2") || fresh(d, "node-3") {
			return fmt.Errorf("dump %+v", d)
		}
		if !slices.Equal(d.Unprotected, []string{"shop/web-3 (node node-3)"}) {
			return fmt.Errorf("unprotected pods %v, want only shop/web-3", d.Unprotected)
		}
		return nil
	})

	// Every combination, PERMISSIVE: nothing fails.
	waitfor.NoError(t, 60*time.Second, "client-1 -> web-2 over the mesh", func() error {
		r, err := get(client1, web2, "hbone")
		if err != nil {
			return err
		}
		return seenFrom(r, web2, client1.IP, true)
	})
	waitfor.NoError(t, 30*time.Second, "node-2 logged client-1 -> web-2 as mTLS", func() error {
		recs, err := m.AccessLog("node-2")
		if err != nil {
			return err
		}
		for _, x := range recs {
			if x.Msg == "connection" && x.Reporter == "destination" &&
				x.SrcSPIFFEID == "spiffe://cluster.local/ns/client/sa/client" && x.Security == "mutual_tls" {
				return nil
			}
		}
		return fmt.Errorf("no mTLS record of client-1 on node-2")
	})
	r, err := get(client1, web3, "passthrough")
	if err != nil {
		t.Fatalf("enrolled pod to an enrolled pod on a node without agent failed (must fall back to plaintext): %v", err)
	}
	if err := seenFrom(r, web3, client1.IP, false); err != nil {
		t.Fatalf("passthrough to web-3: %v", err)
	}
	if r, err = get(outsider3, web2, "permissive-in"); err != nil {
		t.Fatalf("unenrolled pod to a PERMISSIVE enrolled pod: %v", err)
	}
	if err := seenFrom(r, web2, outsider3.IP, true); err != nil {
		t.Fatalf("plaintext inbound to web-2: %v", err)
	}
	// An enrolled pod on the node without an agent is not captured: its
	// connection reaches web-2 in plaintext (PERMISSIVE).
	if r, err = get(web3, web2, "unprotected-source"); err != nil {
		t.Fatalf("enrolled pod without an agent to a PERMISSIVE enrolled pod: %v", err)
	}
	if err := seenFrom(r, web2, web3.IP, true); err != nil {
		t.Fatalf("plaintext inbound from web-3 to web-2: %v", err)
	}
	// Enrolled to unenrolled: plaintext passthrough.
	if r, err = get(client1, outsider3, "to-unenrolled"); err != nil {
		t.Fatalf("enrolled pod to an unenrolled pod: %v", err)
	}
	if err := seenFrom(r, outsider3, client1.IP, false); err != nil {
		t.Fatal(err)
	}
	if r, err = get(outsider3, web3, "no-mesh"); err != nil {
		t.Fatalf("outside the mesh entirely: %v", err)
	}
	if err := seenFrom(r, web3, outsider3.IP, false); err != nil {
		t.Fatal(err)
	}

	// The ledger: exactly the plaintext connections above involving an
	// enrolled pod, with the bytes the agents' access logs recorded for
	// them; the STRICT dry run for shop predicts the two refusals below.
	type pair struct {
		Direction, Src, Dst string
		DstEnrolled         bool
		Connections, Bytes  int64
	}
	ledger := func(node string) (got []pair, strict []pair, err error) {
		var r struct {
			Top      []pair `json:"top"`
			IfStrict struct {
				Pairs []pair `json:"pairs"`
			} `json:"ifStrict"`
		}
		b, err := m.Get(ctx, node, "/exposure?window=10m&if-strict=shop&top=100")
		if err != nil {
			return nil, nil, err
		}
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, nil, err
		}
		return r.Top, r.IfStrict.Pairs, nil
	}
	loggedBytes := func(node, reporter, src, dst string) (int64, error) {
		recs, err := m.AccessLog(node)
		if err != nil {
			return 0, err
		}
		var n int64
		var found int
		for _, x := range recs {
			h1, _, _ := net.SplitHostPort(x.Src)
			h2, _, _ := net.SplitHostPort(x.Dst)
			if x.Msg == "connection" && x.Reporter == reporter && h1 == src && h2 == dst {
				n += x.BytesSent + x.BytesReceived
				found++
			}
		}
		if found != 1 {
			return 0, fmt.Errorf("%d access-log records on %s for %s -> %s, want 1", found, node, src, dst)
		}
		return n, nil
	}
	type flow struct {
		reporter     string
		p            pair
		srcIP, dstIP string
	}
	for node, want := range map[string][]flow{
		"node-1": {
			{"source", pair{Direction: "outbound", Src: client1.Key(), Dst: web3.Key(), DstEnrolled: true, Connections: 1}, client1.IP, web3.IP},
			{"source", pair{Direction: "outbound", Src: client1.Key(), Dst: outsider3.Key(), Connections: 1}, client1.IP, outsider3.IP},
		},
		"node-2": {
			{"destination", pair{Direction: "inbound", Src: outsider3.Key(), Dst: web2.Key(), DstEnrolled: true, Connections: 1}, outsider3.IP, web2.IP},
			{"destination", pair{Direction: "inbound", Src: web3.Key(), Dst: web2.Key(), DstEnrolled: true, Connections: 1}, web3.IP, web2.IP},
		},
	} {
		waitfor.NoError(t, 30*time.Second, "ledger on "+node, func() error {
			var wantAll, wantStrict []pair
			for _, f := range want {
				bytes, err := loggedBytes(node, f.reporter, f.srcIP, f.dstIP)
				if err != nil {
					return err
				}
				if bytes == 0 {
					return fmt.Errorf("no bytes logged for %+v", f.p)
				}
				w := f.p
				w.Bytes = bytes
				wantAll = append(wantAll, w)
				if w.DstEnrolled {
					wantStrict = append(wantStrict, w)
				}
			}
			got, strict, err := ledger(node)
			if err != nil {
				return err
			}
			cmpPairs := func(a, b pair) int { return strings.Compare(a.Src+a.Dst, b.Src+b.Dst) }
			slices.SortFunc(got, cmpPairs)
			slices.SortFunc(strict, cmpPairs)
			slices.SortFunc(wantAll, cmpPairs)
			slices.SortFunc(wantStrict, cmpPairs)
			if !slices.Equal(got, wantAll) {
				return fmt.Errorf("ledger on %s: %+v, want exactly %+v", node, got, wantAll)
			}
			if !slices.Equal(strict, wantStrict) {
				return fmt.Errorf("STRICT dry run on %s: %+v, want exactly %+v", node, strict, wantStrict)
			}
			return nil
		})
	}
	if _, _, err := ledger("node-3"); err == nil {
		t.Fatal("node-3 has no agent, yet answered")
	}

	// STRICT for shop: web-3 (no agent) is refused at the source with a
	// logged reason; web-2 still works over HBONE; plaintext into web-2 is
	// refused.
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
	waitfor.NoError(t, 60*time.Second, "client-1 -> web-3 refused under STRICT", func() error {
		if r, err := get(client1, web3, "strict-unprotected"); err == nil {
			return fmt.Errorf("still reached: %+v", r)
		}
		b, err := os.ReadFile(m.Agents["node-1"].Log)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "refusing outbound connection") && strings.Contains(line, "shop/web-3") && strings.Contains(line, "STRICT") {
				return nil
			}
		}
		return fmt.Errorf("refused, but node-1 logged no reason naming shop/web-3")
	})
	if r, err := get(client1, web2, "strict-hbone"); err != nil {
		t.Fatalf("HBONE to a STRICT pod with an agent: %v", err)
	} else if err := seenFrom(r, web2, client1.IP, true); err != nil {
		t.Fatal(err)
	}
	// The rest of the dry run's prediction: plaintext into web-2 is refused.
	for _, from := range []lab.Pod{outsider3, web3} {
		if r, err := get(from, web2, "strict-plaintext"); err == nil {
			t.Fatalf("plaintext from %s reached a STRICT pod: %+v", from.Key(), r)
		}
	}
	// Not predicted, not refused: enrolled to unenrolled.
	if _, err := get(client1, outsider3, "strict-to-unenrolled"); err != nil {
		t.Fatalf("STRICT in shop refused client-1 -> outsider-3: %v", err)
	}

	// SIGKILL node-2's agent: its mark is not withdrawn and must expire.
	killed := time.Now()
	if err := syscall.Kill(m.Agents["node-2"].Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitfor.NoError(t, 30*time.Second, "node-2's stale mark recognised by node-1", func() error {
		d, err := dumpOf("node-1")
		if err != nil {
			return err
		}
		if fresh(d, "node-2") {
			return fmt.Errorf("node-2 still mesh-capable %s after SIGKILL", time.Since(killed).Round(time.Millisecond))
		}
		return nil
	})
	expiry := time.Since(killed)
	t.Logf("node-2's mark expired %s after SIGKILL (lease duration 10s)", expiry.Round(time.Millisecond))
	if expiry > 20*time.Second {
		t.Errorf("stale mark took %s to be recognised", expiry)
	}
	// STRICT web-2 is now refused at node-1 with a reason, and without
	// STRICT its pinned capture still fails closed (no plaintext reaches it).
	if r, err := get(client1, web2, "after-kill-strict"); err == nil {
		t.Fatalf("reached STRICT web-2 whose agent is dead: %+v", r)
	}
	if err := paRes.Delete(ctx, "strict", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitfor.NoError(t, 60*time.Second, "web-3 reachable again in plaintext", func() error {
		_, err := get(client1, web3, "permissive-again")
		return err
	})
	for _, from := range []lab.Pod{client1, outsider3} {
		if r, err := get(from, web2, "after-kill"); err == nil {
			t.Fatalf("%s reached web-2 whose agent was SIGKILLed: %+v (it must fail closed)", from.Key(), r)
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
