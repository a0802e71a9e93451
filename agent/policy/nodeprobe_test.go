package policy

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// TestNodeProbePorts: the probe ports capture may open to the node while
// the agent is away are exactly those every policy admits from the node
// anyway (checked against Decide, under STRICT, a deny-all NetworkPolicy
// and an ALLOW AuthorizationPolicy the node does not match), and none for
// a pod a DENY AuthorizationPolicy selects, which only the agent can judge.
func TestNodeProbePorts(t *testing.T) {
	strict := pa("nodemesh-system", "mesh", "mtls: {mode: STRICT}") +
		np("shop", "deny-in", "podSelector: {}\npolicyTypes: [Ingress]") +
		ap("shop", "be-allow", "selector: {matchLabels: {app: be}}\naction: ALLOW\nrules:\n- from:\n  - source: {principals: [\""+idFE+"\"]}")
	for _, tc := range []struct {
		name, docs string
		pod        string
		want       []uint16
	}{
		{"no policy", "", "shop/be", []uint16{8081}},
		{"STRICT, deny-all NetworkPolicy, ALLOW not matching the node", strict, "shop/be", []uint16{8081}},
		{"a pod without probes", strict, "shop/fe", nil},
		{"an unknown pod", strict, "shop/nope", nil},
		{"a DENY AuthorizationPolicy selects the pod", strict + ap("shop", "be-deny", "selector: {matchLabels: {app: be}}\naction: DENY\nrules:\n- to:\n  - operation: {paths: [/admin]}"), "shop/be", nil},
		{"a DENY AuthorizationPolicy selecting another pod", strict + ap("shop", "fe-deny", "selector: {matchLabels: {app: fe}}\naction: DENY\nrules: [{}]"), "shop/be", []uint16{8081}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := shopSnapshot(t, tc.docs)
			got := s.NodeProbePorts(tc.pod)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("NodeProbePorts(%s) = %v, want %v", tc.pod, got, tc.want)
			}
			for _, port := range got {
				d := s.Decide(Flow{Src: ipNode1, DstPod: tc.pod, Port: port, Protocol: corev1.ProtocolTCP})
				if !d.Allowed() {
					t.Errorf("port %d is opened to the node, but the policy denies the node:\n%s", port, d.Text())
				}
			}
		})
	}
	// Unmeshed pods are not captured at all.
	in := shopInput()
	in.Pods[1].Unmeshed = true
	if got := NewSnapshot(1, in, Options{}).NodeProbePorts("shop/be"); got != nil {
		t.Errorf("unmeshed pod: %v, want none", got)
	}
}
