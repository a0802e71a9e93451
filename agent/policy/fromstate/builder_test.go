package fromstate

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// TestBuilderMatchesFreshConversion drives a state store through random
// changes (pods with IP reuse between a finished and a live pod, labels,
// enrollment, NetworkPolicies, readable and unreadable custom objects) and
// checks after each that a long-lived Builder and an Engine with its cache
// decide exactly as a fresh Snapshot does.
func TestBuilderMatchesFreshConversion(t *testing.T) {
	steps := 1000
	if testing.Short() {
		steps = 100
	}
	seed := uint64(rand.Int64())
	rnd := rand.New(rand.NewPCG(seed, 18))
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	nss := []string{"a", "b", policy.DefaultRootNamespace}
	apps := []string{"x", "y"}
	pick := func(l []string) string { return l[rnd.IntN(len(l))] }
	ip := func() netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + rnd.IntN(12))}) }
	change := func(tx *state.Tx) string {
		ns := pick(nss)
		switch k := rnd.IntN(100); {
		case k < 40:
			name := fmt.Sprintf("p%d", rnd.IntN(5))
			phase := state.PodRunning
			if rnd.IntN(5) == 0 {
				phase = state.PodSucceeded
			}
			tx.SetPod(&state.Pod{Namespace: ns, Name: name, ServiceAccount: pick([]string{"s0", "s1"}), Node: "n1",
				Labels: map[string]string{"app": pick(apps)}, IPs: []netip.Addr{ip()}, Phase: phase,
				Ports: []state.ContainerPort{{Name: "http", Port: uint16(8080 + rnd.IntN(2)), Protocol: "TCP"}}})
			return "pod " + ns + "/" + name
		case k < 50:
			tx.DeletePod(state.Key{Namespace: ns, Name: fmt.Sprintf("p%d", rnd.IntN(5))})
			return "delete pod"
		case k < 60:
			l := map[string]string{"team": pick(apps)}
			if rnd.IntN(2) == 0 {
				l[state.LabelMode] = state.ModeEnabled
			}
			tx.SetNamespace(&state.Namespace{Name: ns, Labels: l})
			return "namespace " + ns
		case k < 75:
			name := fmt.Sprintf("np%d", rnd.IntN(3))
			if rnd.IntN(3) == 0 {
				tx.DeleteNetworkPolicy(state.Key{Namespace: ns, Name: name})
				return "delete NetworkPolicy"
			}
			tx.SetNetworkPolicy(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": pick(apps)}},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
						{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": pick(apps)}}}}}},
				}})
			return "NetworkPolicy " + ns + "/" + name
		case k < 88:
			name := fmt.Sprintf("ap%d", rnd.IntN(3))
			if rnd.IntN(3) == 0 {
				tx.DeleteObject(AuthorizationPolicyKind, state.Key{Namespace: ns, Name: name})
				return "delete AuthorizationPolicy"
			}
			o := object(t, AuthorizationPolicyKind, &v1alpha1.AuthorizationPolicy{
				TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "AuthorizationPolicy"},
				Spec: v1alpha1.AuthorizationPolicySpec{Action: v1alpha1.Action(pick([]string{"ALLOW", "DENY"})),
					Rules: []v1alpha1.Rule{{From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Namespaces: []string{pick(nss)}}}}}}},
			}, ns, name)
			if rnd.IntN(4) == 0 {
				o.Content["spec"] = map[string]any{"rules": "not a list"} // unreadable
			}
			tx.SetObject(o)
			return "AuthorizationPolicy " + ns + "/" + name
		default:
			name := "pa"
			if rnd.IntN(3) == 0 {
				tx.DeleteObject(PeerAuthenticationKind, state.Key{Namespace: ns, Name: name})
				return "delete PeerAuthentication"
			}
			tx.SetObject(object(t, PeerAuthenticationKind, &v1alpha1.PeerAuthentication{
				TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "PeerAuthentication"},
				Spec:     v1alpha1.PeerAuthenticationSpec{Mtls: &v1alpha1.PeerAuthenticationMTLS{Mode: v1alpha1.MTLSMode(pick([]string{"STRICT", "PERMISSIVE"}))}},
			}, ns, name))
			return "PeerAuthentication " + ns
		}
	}
	b := NewBuilder("")
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
	for step := range steps {
		var what string
		st.Update(func(tx *state.Tx) { what = change(tx) })
		snap := st.Snapshot()
		inc, errs1 := b.Snapshot(snap)
		fresh, errs2 := Snapshot(snap, "")
		if fmt.Sprint(errs1) != fmt.Sprint(errs2) || fmt.Sprint(inc.Problems()) != fmt.Sprint(fresh.Problems()) {
			t.Fatalf("step %d (seed %d, %s): errors or problems differ: %v / %v", step, seed, what, errs1, errs2)
		}
		for i := range 24 {
			f := policy.Flow{Src: netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + i%12)}), Dst: netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + (i*5)%12)}),
				Port: uint16(8080 + i%2), Protocol: corev1.ProtocolTCP}
			if i%3 == 0 {
				f.Principal = "spiffe://cluster.local/ns/" + nss[i%len(nss)] + "/sa/s0"
			}
			if a, b := js(e.Decide(inc, f)), js(fresh.Decide(f)); a != b {
				t.Fatalf("step %d (seed %d, %s): decision for %+v differs:\nincremental %s\nfresh       %s", step, seed, what, f, a, b)
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
