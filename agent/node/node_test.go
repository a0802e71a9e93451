package node

import "testing"

func TestMeshCapableWithoutPeers(t *testing.T) {
	n := &Node{cfg: Config{NodeName: "self"}}
	if !n.meshCapable("other") || !n.meshCapable("self") {
		t.Error("without an API server every node must count as mesh-capable (HBONE, failing closed)")
	}
}
