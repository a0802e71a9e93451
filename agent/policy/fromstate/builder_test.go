package fromstate

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// TestBuilderMatchesFreshConversion drives a state store through thousands
// of random changes and checks after each build that a long-lived Builder
// (which converts only what changed since the state snapshot it saw last)
// and an Engine with its cache decide exactly as a fresh conversion and
// full build do. The changes: pods added, replaced, relabelled and
// removed, with address reuse between a finished and a live pod and
// host-network pods; namespaces relabelled, flipping enrollment, removed;
// node addresses and the local node's interface addresses; NetworkPolicies,
// AuthorizationPolicies and PeerAuthentications added, changed and
// removed, including unreadable ones, in the root namespace too; and now
// and then a Reset. Several changes may land between two builds, and
// state snapshots the Builder never sees may be taken between them.
func TestBuilderMatchesFreshConversion(t *testing.T) {
	steps := 3000
	if testing.Short() {
		steps = 300
	}
	seed := uint64(rand.Int64())
	t.Logf("seed %d", seed)
	rnd := rand.New(rand.NewPCG(seed, 18))
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	nss := []string{"a", "b", "c", policy.DefaultRootNamespace}
	apps := []string{"x", "y", "z"}
	pick := func(l []string) string { return l[rnd.IntN(len(l))] }
	ip := func() netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + rnd.IntN(16))}) }
	nodeIP := func() netip.Addr { return netip.AddrFrom4([4]byte{192, 168, 0, byte(1 + rnd.IntN(4))}) }
	pods := map[state.Key]*state.Pod{}
	var local []netip.Addr
	localAddrs := func() []netip.Addr { return local }
	change := func(tx *state.Tx) string {
		ns := pick(nss)
		switch k := rnd.IntN(100); {
		case k == 0:
			tx.Reset()
			clear(pods)
			return "reset"
		case k < 25:
			name := fmt.Sprintf("p%d", rnd.IntN(6))
			phase := state.PodRunning
			if rnd.IntN(5) == 0 {
				phase = state.PodSucceeded
			}
			p := &state.Pod{Namespace: ns, Name: name, ServiceAccount: pick([]string{"s0", "s1"}), Node: pick([]string{"n1", "n2"}),
				Labels: map[string]string{"app": pick(apps)}, IPs: []netip.Addr{ip()}, Phase: phase, HostNetwork: rnd.IntN(15) == 0,
				Ports: []state.ContainerPort{{Name: "http", Port: uint16(8080 + rnd.IntN(2)), Protocol: "TCP"}}}
			if rnd.IntN(4) == 0 {
				p.ProbePorts = []uint16{8081}
			}
			if rnd.IntN(6) == 0 {
				p.Labels[state.LabelMode] = state.ModeDisabled
			}
			tx.SetPod(p)
			pods[p.Key()] = p
			return "pod " + ns + "/" + name
		case k < 35: // relabel: the same pod with new labels
			for key, old := range pods {
				p := &state.Pod{Namespace: old.Namespace, Name: old.Name, ServiceAccount: old.ServiceAccount, Node: old.Node,
					Labels: map[string]string{"app": pick(apps)}, IPs: old.IPs, Phase: old.Phase, HostNetwork: old.HostNetwork,
					Ports: old.Ports, ProbePorts: old.ProbePorts}
				tx.SetPod(p)
				pods[key] = p
				return "relabel " + key.String()
			}
			return "nothing to relabel"
		case k < 43:
			for key := range pods {
				tx.DeletePod(key)
				delete(pods, key)
				return "delete pod " + key.String()
			}
			return "nothing to delete"
		case k < 53:
			if rnd.IntN(6) == 0 {
				tx.DeleteNamespace(ns)
				return "delete namespace " + ns
			}
			l := map[string]string{"team": pick(apps)}
			if rnd.IntN(2) == 0 {
				l[state.LabelMode] = state.ModeEnabled
			}
			tx.SetNamespace(&state.Namespace{Name: ns, Labels: l})
			return "namespace " + ns + " " + fmt.Sprint(l)
		case k < 57:
			n := pick([]string{"n1", "n2"})
			if rnd.IntN(4) == 0 {
				tx.DeleteNode(n)
				return "delete node " + n
			}
			tx.SetNode(&state.Node{Name: n, IPs: []netip.Addr{nodeIP()}})
			return "node " + n
		case k < 60:
			local = nil
			if rnd.IntN(2) == 0 {
				local = []netip.Addr{nodeIP()}
			}
			return fmt.Sprint("local addresses ", local)
		case k < 75:
			name := fmt.Sprintf("np%d", rnd.IntN(3))
			if rnd.IntN(3) == 0 {
				tx.DeleteNetworkPolicy(state.Key{Namespace: ns, Name: name})
				return "delete NetworkPolicy " + ns + "/" + name
			}
			np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": pick(apps)}},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
						{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": pick(apps)}}},
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": pick(apps)}}}}}},
				}}
			if rnd.IntN(2) == 0 {
				np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
				np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{
					{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": pick(apps)}}}}}}
			}
			tx.SetNetworkPolicy(np)
			return "NetworkPolicy " + ns + "/" + name
		case k < 90:
			name := fmt.Sprintf("ap%d", rnd.IntN(3))
			if rnd.IntN(3) == 0 {
				tx.DeleteObject(AuthorizationPolicyKind, state.Key{Namespace: ns, Name: name})
				return "delete AuthorizationPolicy " + ns + "/" + name
			}
			spec := v1alpha1.AuthorizationPolicySpec{Action: v1alpha1.Action(pick([]string{"ALLOW", "DENY", "AUDIT"})),
				Rules: []v1alpha1.Rule{{From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Namespaces: []string{pick(nss)}}}}}}}
			if rnd.IntN(2) == 0 {
				spec.Selector = &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": pick(apps)}}
			}
			if rnd.IntN(4) == 0 {
				spec.Rules[0].When = []v1alpha1.Condition{{Key: "request.headers[" + pick([]string{"x-a", "x-b"}) + "]", Values: []string{"1"}}}
			}
			o := object(t, AuthorizationPolicyKind, &v1alpha1.AuthorizationPolicy{
				TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "AuthorizationPolicy"}, Spec: spec}, ns, name)
			if rnd.IntN(5) == 0 {
				o.Content["spec"] = map[string]any{"action": pick([]string{"ALLOW", "DENY"}), "rules": "not a list"} // unreadable
			}
			tx.SetObject(o)
			return "AuthorizationPolicy " + ns + "/" + name
		default:
			name := fmt.Sprintf("pa%d", rnd.IntN(2))
			if rnd.IntN(3) == 0 {
				tx.DeleteObject(PeerAuthenticationKind, state.Key{Namespace: ns, Name: name})
				return "delete PeerAuthentication " + ns + "/" + name
			}
			pa := &v1alpha1.PeerAuthentication{
				TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "PeerAuthentication"},
				ObjectMeta: metav1.ObjectMeta{CreationTimestamp: metav1.Unix(int64(rnd.IntN(3)), 0)},
				Spec:       v1alpha1.PeerAuthenticationSpec{Mtls: &v1alpha1.PeerAuthenticationMTLS{Mode: v1alpha1.MTLSMode(pick([]string{"STRICT", "PERMISSIVE"}))}},
			}
			if rnd.IntN(2) == 0 {
				pa.Spec.Selector = &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": pick(apps)}}
			}
			o := object(t, PeerAuthenticationKind, pa, ns, name)
			if rnd.IntN(6) == 0 {
				o.Content["spec"] = "unreadable"
			}
			tx.SetObject(o)
			return "PeerAuthentication " + ns + "/" + name
		}
	}
	b := NewBuilder("").WithLocalNode("n1", localAddrs)
	e, err := policy.NewEngine(1024)
	if err != nil {
		t.Fatal(err)
	}
	js := func(d *policy.Decision) string {
		c := *d
		c.SnapshotVersion = 0
		out, _ := json.Marshal(&c)
		return string(out)
	}
	var history []string
	for step := range steps {
		for range 1 + rnd.IntN(3) {
			st.Update(func(tx *state.Tx) {
				for range 1 + rnd.IntN(2) {
					history = append(history, change(tx))
				}
			})
			if rnd.IntN(3) == 0 {
				st.Snapshot() // a snapshot the Builder does not see
			}
		}
		if len(history) > 8 {
			history = history[len(history)-8:]
		}
		snap := st.Snapshot()
		inc, errs1 := b.Snapshot(snap)
		fresh, errs2 := NewBuilder("").WithLocalNode("n1", localAddrs).Snapshot(snap)
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("step %d (seed %d, last changes %s): %s", step, seed, strings.Join(history, "; "), fmt.Sprintf(format, args...))
		}
		if fmt.Sprint(errs1) != fmt.Sprint(errs2) || fmt.Sprint(inc.Problems()) != fmt.Sprint(fresh.Problems()) {
			fail("errors or problems differ: %v %v / %v %v", errs1, inc.Problems(), errs2, fresh.Problems())
		}
		a1, a2, a3, a4 := inc.Counts()
		b1, b2, b3, b4 := fresh.Counts()
		if a1 != b1 || a2 != b2 || a3 != b3 || a4 != b4 || !slices.Equal(inc.RequestHeaders(), fresh.RequestHeaders()) {
			fail("counts or request headers differ: %d %d %d %d %v / %d %d %d %d %v", a1, a2, a3, a4, inc.RequestHeaders(), b1, b2, b3, b4, fresh.RequestHeaders())
		}
		for _, p := range snap.Pods() {
			key := p.Key().String()
			p1, ok1 := inc.Pod(key)
			p2, ok2 := fresh.Pod(key)
			if ok1 != ok2 || fmt.Sprint(p1) != fmt.Sprint(p2) {
				fail("pod %s: %+v / %+v", key, p1, p2)
			}
			for _, port := range []uint16{8080, 8081} {
				m1, by1, _ := inc.MTLSMode(key, port)
				m2, by2, _ := fresh.MTLSMode(key, port)
				if m1 != m2 || by1 != by2 {
					fail("mTLS mode of %s port %d: %s %v / %s %v", key, port, m1, by1, m2, by2)
				}
			}
		}
		for i := range 40 {
			f := policy.Flow{Src: netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + i%16)}), Dst: netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + (i*5+step)%16)}),
				Port: uint16(8080 + i%2), Protocol: corev1.ProtocolTCP}
			switch i % 4 {
			case 0:
				f.Principal = "spiffe://cluster.local/ns/" + nss[(i/4)%len(nss)] + "/sa/s0"
			case 1:
				f.Src = netip.AddrFrom4([4]byte{192, 168, 0, byte(1 + (i/4)%4)}) // a node: kubelet's probes
				f.Port = 8081
			}
			if a, b := js(e.Decide(inc, f)), js(fresh.Decide(f)); a != b {
				fail("decision for %+v differs:\nincremental+cache %s\nfresh             %s", f, a, b)
			}
			if a, b := js(inc.DecideEgress(f)), js(fresh.DecideEgress(f)); a != b {
				fail("egress decision for %+v differs:\nincremental %s\nfresh       %s", f, a, b)
			}
		}
	}
}

// benchStore is a state store with 10,000 enrolled pods in 100 namespaces
// and 7 NetworkPolicies per namespace.
func benchStore(b *testing.B) *state.Store {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		b.Fatal(err)
	}
	st.Update(func(tx *state.Tx) {
		for n := range 100 {
			ns := fmt.Sprintf("ns-%03d", n)
			tx.SetNamespace(&state.Namespace{Name: ns, Labels: map[string]string{state.LabelMode: state.ModeEnabled, "team": fmt.Sprint(n % 10)}})
			for p := range 100 {
				tx.SetPod(&state.Pod{Namespace: ns, Name: fmt.Sprintf("pod-%03d", p), ServiceAccount: fmt.Sprintf("sa-%d", p%10), Node: fmt.Sprintf("node-%d", p%8),
					Labels: map[string]string{"app": fmt.Sprintf("app-%d", p%10)}, IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n / 200), byte(n % 200), byte(p + 1)})},
					Phase: state.PodRunning, Ports: []state.ContainerPort{{Name: "http", Port: 8080, Protocol: "TCP"}}})
			}
			for i := range 7 {
				tx.SetNetworkPolicy(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("np-%d", i)},
					Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", i)}},
						Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
							{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", (i+1)%10)}}}}}}}})
			}
		}
	})
	return st
}

// benchChange relabels one pod, as the churn of the scale benchmark does.
func benchChange(st *state.Store, i int) {
	st.Update(func(tx *state.Tx) {
		n, p := i%100, (i/100)%100
		tx.SetPod(&state.Pod{Namespace: fmt.Sprintf("ns-%03d", n), Name: fmt.Sprintf("pod-%03d", p), ServiceAccount: fmt.Sprintf("sa-%d", p%10), Node: fmt.Sprintf("node-%d", p%8),
			Labels: map[string]string{"app": fmt.Sprintf("app-%d", i%10)}, IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n / 200), byte(n % 200), byte(p + 1)})},
			Phase: state.PodRunning, Ports: []state.ContainerPort{{Name: "http", Port: 8080, Protocol: "TCP"}}})
	})
}

// BenchmarkChangeToPolicySnapshot is the agent's CPU per change at 10,000
// pods: one pod relabelled, then the state snapshot and the policy
// snapshot built, incrementally (Builder) and from scratch (Snapshot).
func BenchmarkChangeToPolicySnapshot(b *testing.B) {
	for _, incremental := range []bool{true, false} {
		name := "full"
		if incremental {
			name = "incremental"
		}
		b.Run(name, func(b *testing.B) {
			st := benchStore(b)
			bl := NewBuilder("")
			bl.Snapshot(st.Snapshot())
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				benchChange(st, i)
				i++
				if incremental {
					bl.Snapshot(st.Snapshot())
				} else {
					Snapshot(st.Snapshot(), "")
				}
			}
		})
	}
}
