package fromstate

import (
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

func object(t testing.TB, gk state.GroupKind, obj runtime.Object, ns, name string) *state.Object {
	t.Helper()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		t.Fatal(err)
	}
	return &state.Object{GroupKind: gk, APIVersion: v1alpha1.SchemeGroupVersion.String(), Namespace: ns, Name: name, Content: m}
}

func TestSnapshotFromState(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	st, err := state.NewStore(td)
	if err != nil {
		t.Fatal(err)
	}
	fe, be, out := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.9.9")
	node := netip.MustParseAddr("192.168.0.1")
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop", Labels: map[string]string{state.LabelMode: state.ModeEnabled}})
		tx.SetNamespace(&state.Namespace{Name: "legacy"})
		tx.SetNode(&state.Node{Name: "n1", IPs: []netip.Addr{node}})
		tx.SetPod(&state.Pod{Namespace: "shop", Name: "fe", ServiceAccount: "frontend", Node: "n1", Labels: map[string]string{"app": "fe"}, IPs: []netip.Addr{fe}, Phase: state.PodRunning})
		tx.SetPod(&state.Pod{Namespace: "shop", Name: "be", ServiceAccount: "backend", Node: "n1", Labels: map[string]string{"app": "be"}, IPs: []netip.Addr{be}, Phase: state.PodRunning,
			Ports: []state.ContainerPort{{Name: "http", Port: 8080, Protocol: "TCP"}}, ProbePorts: []uint16{8081}})
		tx.SetPod(&state.Pod{Namespace: "legacy", Name: "old", Labels: map[string]string{"app": "old"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.3")}, Phase: state.PodRunning})
		tx.SetNetworkPolicy(&networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "be-in"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "be"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "fe"}}}},
				}},
			},
		})
		tx.SetObject(object(t, AuthorizationPolicyKind, &v1alpha1.AuthorizationPolicy{
			TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "AuthorizationPolicy"},
			Spec: v1alpha1.AuthorizationPolicySpec{
				Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": "be"}},
				Rules:    []v1alpha1.Rule{{From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Principals: []string{"example.org/ns/shop/sa/frontend"}}}}}},
			},
		}, "shop", "be-allow"))
		tx.SetObject(object(t, PeerAuthenticationKind, &v1alpha1.PeerAuthentication{
			Spec: v1alpha1.PeerAuthenticationSpec{Mtls: &v1alpha1.PeerAuthenticationMTLS{Mode: v1alpha1.MTLSStrict}},
		}, "nodemesh-system", "mesh"))
		// A custom object that does not convert: fail closed for its namespace.
		tx.SetObject(&state.Object{GroupKind: AuthorizationPolicyKind, APIVersion: v1alpha1.SchemeGroupVersion.String(), Namespace: "legacy", Name: "garbled",
			Content: map[string]any{"spec": map[string]any{"rules": "not-a-list"}}})
	})
	snap, errs := Snapshot(st.Snapshot(), "")
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "legacy/garbled") {
		t.Fatalf("conversion errors %v, want one naming legacy/garbled", errs)
	}
	if snap.Version() != st.Snapshot().Version() {
		t.Errorf("version %d, want the state's %d", snap.Version(), st.Snapshot().Version())
	}
	cases := []struct {
		name string
		flow policy.Flow
		want policy.Verdict
	}{
		{"frontend over mTLS", policy.Flow{Src: fe, Dst: be, Port: 8080, Protocol: corev1.ProtocolTCP, Principal: "spiffe://example.org/ns/shop/sa/frontend"}, policy.Allow},
		{"plaintext refused by mesh STRICT", policy.Flow{Src: fe, Dst: be, Port: 8080, Protocol: corev1.ProtocolTCP}, policy.Deny},
		{"kubelet probe", policy.Flow{Src: node, Dst: be, Port: 8081, Protocol: corev1.ProtocolTCP}, policy.Allow},
		{"outsider denied by NetworkPolicy", policy.Flow{Src: out, Dst: be, Port: 8080, Protocol: corev1.ProtocolTCP, Principal: "spiffe://example.org/ns/x/sa/y"}, policy.Deny},
		{"unmeshed legacy pod: NetworkPolicy only, garbled policy not enforced there", policy.Flow{Src: out, Dst: netip.MustParseAddr("10.0.0.3"), Port: 80, Protocol: corev1.ProtocolTCP}, policy.Allow},
	}
	for _, tc := range cases {
		if d := snap.Decide(tc.flow); d.Verdict != tc.want {
			t.Errorf("%s: %s, want %s\n%s", tc.name, d.Verdict, tc.want, d.Text())
		}
	}
	if p := snap.Problems(); len(p) != 1 || p[0].Ref.Name != "garbled" {
		t.Errorf("problems %v, want the garbled stand-in", p)
	}

	// Garbled objects in a meshed namespace: an ALLOW selects the namespace
	// and matches nothing (fe had no ALLOW policy, so it closes); a DENY (or
	// an unreadable action) denies the whole namespace.
	feFlow := policy.Flow{Src: be, Dst: fe, Port: 80, Protocol: corev1.ProtocolTCP, Principal: "spiffe://example.org/ns/shop/sa/backend"}
	if d := snap.Decide(feFlow); !d.Allowed() {
		t.Fatalf("before: %s", d.Text())
	}
	for _, tc := range []struct {
		name   string
		spec   map[string]any
		flow   policy.Flow
		reason string
	}{
		{"garbled-allow", map[string]any{"rules": "not-a-list"}, feFlow, "ALLOW AuthorizationPolicies select shop/fe"},
		{"garbled-deny", map[string]any{"action": "DENY", "rules": 7}, cases[0].flow, "denies every connection"},
		{"garbled-action", map[string]any{"action": 7}, cases[0].flow, "denies every connection"},
	} {
		st.Update(func(tx *state.Tx) {
			tx.SetObject(&state.Object{GroupKind: AuthorizationPolicyKind, APIVersion: v1alpha1.SchemeGroupVersion.String(), Namespace: "shop", Name: tc.name,
				Content: map[string]any{"spec": tc.spec}})
		})
		snap2, _ := Snapshot(st.Snapshot(), "")
		d := snap2.Decide(tc.flow)
		if d.Allowed() || !strings.Contains(d.Reason, tc.reason) {
			t.Errorf("%s did not fail closed as expected (want reason containing %q):\n%s", tc.name, tc.reason, d.Text())
		}
		st.Update(func(tx *state.Tx) {
			tx.DeleteObject(AuthorizationPolicyKind, state.Key{Namespace: "shop", Name: tc.name})
		})
	}
}

// TestLocalNodeAddresses: kubelet's probes from the node's bridge gateway
// (an address of the node's own interfaces, not of its Node object) pass a
// NetworkPolicy and STRICT only through WithLocalNode, and only for pods of
// that node.
func TestLocalNodeAddresses(t *testing.T) {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("example.org"))
	if err != nil {
		t.Fatal(err)
	}
	be, gw := netip.MustParseAddr("10.244.0.5"), netip.MustParseAddr("10.244.0.1")
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop", Labels: map[string]string{state.LabelMode: state.ModeEnabled}})
		tx.SetNode(&state.Node{Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.168.0.1")}})
		tx.SetPod(&state.Pod{Namespace: "shop", Name: "be", Node: "n1", Labels: map[string]string{"app": "be"}, IPs: []netip.Addr{be}, Phase: state.PodRunning, ProbePorts: []uint16{8080}})
		tx.SetNetworkPolicy(&networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "nothing-in"},
			Spec:       networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{}, PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
		})
		tx.SetObject(object(t, PeerAuthenticationKind, &v1alpha1.PeerAuthentication{
			Spec: v1alpha1.PeerAuthenticationSpec{Mtls: &v1alpha1.PeerAuthenticationMTLS{Mode: v1alpha1.MTLSStrict}},
		}, "shop", "strict"))
	})
	probe := policy.Flow{Src: gw, Dst: be, Port: 8080, Protocol: corev1.ProtocolTCP}
	for _, tc := range []struct {
		name string
		b    *Builder
		want policy.Verdict
	}{
		{"no local addresses", NewBuilder(""), policy.Deny},
		{"the pod's node", NewBuilder("").WithLocalNode("n1", func() []netip.Addr { return []netip.Addr{gw} }), policy.Allow},
		{"another node", NewBuilder("").WithLocalNode("n2", func() []netip.Addr { return []netip.Addr{gw} }), policy.Deny},
	} {
		snap, errs := tc.b.Snapshot(st.Snapshot())
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		if d := snap.Decide(probe); d.Verdict != tc.want {
			t.Errorf("%s: %s, want %s\n%s", tc.name, d.Verdict, tc.want, d.Text())
		}
		other := probe
		other.Port = 9090 // not a probe port: the node gets no exemption there
		if d := snap.Decide(other); d.Allowed() {
			t.Errorf("%s: plaintext from the node to a non-probe port allowed under STRICT:\n%s", tc.name, d.Text())
		}
	}
}
