package explain

import (
	"bytes"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/nodemesh/nodemesh/agent/policy"
)

// TestSidecarNamedPorts: a NetworkPolicy's named port resolves against the
// pod's containers and its sidecars (init containers with restartPolicy:
// Always), as Kubernetes resolves named ports, but not against an ordinary
// init container, which has exited before the pod serves. The objects are
// the ones TestLabExplainMatchesAgent also feeds to a live agent.
func TestSidecarNamedPorts(t *testing.T) {
	var warn bytes.Buffer
	snap, err := LoadDir("testdata/intake", policy.Options{}, &warn)
	if err != nil {
		t.Fatalf("LoadDir: %v\n%s", err, warn.String())
	}
	engine, err := policy.NewEngine(0)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		port uint16
		what string
		want policy.Verdict
	}{
		{8080, "container port http", policy.Allow},
		{9090, "sidecar port metrics", policy.Allow},
		{7070, "ordinary init container port seed", policy.Deny},
	} {
		f := policy.Flow{SrcPod: "shop/a", Principal: "spiffe://cluster.local/ns/shop/sa/default", DstPod: "y/b", Port: tc.port, Protocol: corev1.ProtocolTCP}
		if d := engine.Decide(snap, f); d.Verdict != tc.want {
			t.Errorf("%s (%d): %s, want %s\n%s", tc.what, tc.port, d.Verdict, tc.want, d.Text())
		}
	}
}
