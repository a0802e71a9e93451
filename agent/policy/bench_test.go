package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

const (
	benchNamespaces   = 100
	benchPodsPerNS    = 100 // 10,000 pods
	benchNetpolsPerNS = 7   // 700 NetworkPolicies
	benchAuthzPerNS   = 3   // 300 AuthorizationPolicies: 1,000 policies in all
)

func benchIP(ns, pod int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(ns / 200), byte(ns % 200), byte(pod + 1)})
}

func benchInput() Input {
	var in Input
	tcp := corev1.ProtocolTCP
	for n := 0; n < benchNamespaces; n++ {
		ns := fmt.Sprintf("ns-%03d", n)
		in.Namespaces = append(in.Namespaces, Namespace{Name: ns, Labels: map[string]string{"team": fmt.Sprintf("team-%d", n%10)}})
		for p := 0; p < benchPodsPerNS; p++ {
			in.Pods = append(in.Pods, Pod{
				Namespace: ns, Name: fmt.Sprintf("pod-%03d", p),
				Labels:         map[string]string{"app": fmt.Sprintf("app-%d", p%10), "tier": fmt.Sprintf("tier-%d", p%3)},
				IPs:            []netip.Addr{benchIP(n, p)},
				ServiceAccount: fmt.Sprintf("sa-%d", p%10), Node: fmt.Sprintf("node-%d", p%8),
				Ports: []ContainerPort{{Name: "http", Port: 8080, Protocol: tcp}},
			})
		}
		for i := 0; i < benchNetpolsPerNS; i++ {
			port := intstr.FromString("http")
			in.NetworkPolicies = append(in.NetworkPolicies, &networkingv1.NetworkPolicy{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("np-%d", i)},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", i)}},
					PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{
						From: []networkingv1.NetworkPolicyPeer{
							{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", (i+1)%10)}}},
							{NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "team", Operator: metav1.LabelSelectorOpIn, Values: []string{"team-1", "team-2"}}}},
								PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "tier-0"}}},
						},
						Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
					}},
					Egress: []networkingv1.NetworkPolicyEgressRule{{
						To: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}}},
					}},
				},
			})
		}
		for i := 0; i < benchAuthzPerNS; i++ {
			in.AuthorizationPolicies = append(in.AuthorizationPolicies, &v1alpha1.AuthorizationPolicy{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("ap-%d", i)},
				Spec: v1alpha1.AuthorizationPolicySpec{
					Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", i)}},
					Rules: []v1alpha1.Rule{{
						From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Principals: []string{"cluster.local/ns/" + ns + "/sa/*", "*/sa/sa-1"}}}},
						To:   []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{Ports: []string{"8080"}}}},
					}},
				},
			})
		}
	}
	return in
}

func benchFlows(n int) []Flow {
	flows := make([]Flow, n)
	for i := range flows {
		sn, sp := (i*7)%benchNamespaces, (i*13)%benchPodsPerNS
		dn, dp := (i*11)%benchNamespaces, (i*17)%benchPodsPerNS
		flows[i] = Flow{
			Src: benchIP(sn, sp), Dst: benchIP(dn, dp), Port: 8080, Protocol: corev1.ProtocolTCP,
			Principal: fmt.Sprintf("spiffe://cluster.local/ns/ns-%03d/sa/sa-%d", sn, sp%10),
		}
	}
	return flows
}

func TestBenchInputShape(t *testing.T) {
	s := NewSnapshot(1, benchInput(), Options{})
	pods, nps, azs, _ := s.Counts()
	if pods != 10000 || nps+azs != 1000 || len(s.Problems()) > 0 {
		t.Fatalf("pods %d, policies %d, problems %v", pods, nps+azs, s.Problems())
	}
	allowed := 0
	for _, f := range benchFlows(1000) {
		if s.Decide(f).Allowed() {
			allowed++
		}
	}
	// Both verdicts occur, so the benchmark measures real evaluation paths.
	if allowed == 0 || allowed == 1000 {
		t.Fatalf("%d of 1000 flows allowed", allowed)
	}
}

func BenchmarkNewSnapshot(b *testing.B) {
	in := benchInput()
	b.ReportAllocs()
	for b.Loop() {
		NewSnapshot(1, in, Options{})
	}
}

// BenchmarkDecideUncached: a full evaluation (both directions) per call.
func BenchmarkDecideUncached(b *testing.B) {
	s := NewSnapshot(1, benchInput(), Options{})
	flows := benchFlows(4096)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		s.Decide(flows[i%len(flows)])
		i++
	}
}

// BenchmarkDecideCached: the agent's steady state, an Engine hit per call.
func BenchmarkDecideCached(b *testing.B) {
	s := NewSnapshot(1, benchInput(), Options{})
	e, err := NewEngine(0)
	if err != nil {
		b.Fatal(err)
	}
	flows := benchFlows(4096)
	for _, f := range flows {
		e.Decide(s, f)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		e.Decide(s, flows[i%len(flows)])
		i++
	}
}

func BenchmarkDecideCachedParallel(b *testing.B) {
	s := NewSnapshot(1, benchInput(), Options{})
	e, err := NewEngine(0)
	if err != nil {
		b.Fatal(err)
	}
	flows := benchFlows(4096)
	for _, f := range flows {
		e.Decide(s, f)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			e.Decide(s, flows[i%len(flows)])
			i++
		}
	})
}

// benchPodChange returns the bench input after one pod's labels changed
// (i picks the pod); benchPolicyChange after one NetworkPolicy was replaced.
func benchPodChange(in Input, i int) Input {
	out := in
	out.Pods = slices.Clone(in.Pods)
	p := &out.Pods[i%len(out.Pods)]
	p.Labels = map[string]string{"app": fmt.Sprintf("app-%d", i%10), "tier": fmt.Sprintf("tier-%d", (i+1)%3)}
	return out
}

func benchPolicyChange(in Input, i int) Input {
	out := in
	out.NetworkPolicies = slices.Clone(in.NetworkPolicies)
	k := i % len(out.NetworkPolicies)
	np := out.NetworkPolicies[k].DeepCopy()
	np.Spec.PodSelector.MatchLabels = map[string]string{"app": fmt.Sprintf("app-%d", i%10)}
	out.NetworkPolicies[k] = np
	return out
}

// BenchmarkBuildAfterPodChange: what the agent spends on the policy
// snapshot when one pod's labels change (10,000 pods, 1,000 policies);
// compare BenchmarkNewSnapshot, the full rebuild.
func BenchmarkBuildAfterPodChange(b *testing.B) {
	in := benchInput()
	bl := NewBuilder(Options{})
	bl.Build(1, in)
	changed := make([]Input, 64)
	for i := range changed {
		changed[i] = benchPodChange(in, i*157)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		bl.Build(uint64(i+2), changed[i%len(changed)])
		i++
	}
}

// BenchmarkBuildAfterPolicyChange: one NetworkPolicy replaced.
func BenchmarkBuildAfterPolicyChange(b *testing.B) {
	in := benchInput()
	bl := NewBuilder(Options{})
	bl.Build(1, in)
	changed := make([]Input, 64)
	for i := range changed {
		changed[i] = benchPolicyChange(in, i*13)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		bl.Build(uint64(i+2), changed[i%len(changed)])
		i++
	}
}

// BenchmarkDecideCachedAfterChange: an Engine hit in a newer snapshot
// where the change did not touch the flow (the dependency check).
func BenchmarkDecideCachedAfterChange(b *testing.B) {
	in := benchInput()
	bl := NewBuilder(Options{})
	s1 := bl.Build(1, in)
	e, err := NewEngine(0)
	if err != nil {
		b.Fatal(err)
	}
	flows := benchFlows(4096)
	for _, f := range flows {
		e.Decide(s1, f)
	}
	snaps := []*Snapshot{s1, bl.Build(2, benchPodChange(in, 9999))}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		// Alternate snapshots so every call takes the dependency check.
		e.Decide(snaps[(i/len(flows))%2], flows[i%len(flows)])
		i++
	}
}
