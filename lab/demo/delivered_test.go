package demo

import (
	"errors"
	"fmt"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/nodemesh/nodemesh/lab/workload"
	"github.com/nodemesh/nodemesh/redirect"
)

// TestCheckDelivered: what lab tests accept as "the destination agent
// delivered it" on kernels with and without transparent delivery (before
// Linux 5.17 the agent delivers from the pod's own address, so tests that
// required the client's address and the delivery mark failed there
// although the agent worked).
func TestCheckDelivered(t *testing.T) {
	transparent := error(nil)
	fallback := fmt.Errorf("probing transparent delivery: the kernel's sk_lookup lacks ingress_ifindex: %w", ebpf.ErrNotSupported)
	const pod, client = "shop/web-2", "10.244.1.2"
	reply := func(remote, local string, mark uint32) workload.Reply {
		return workload.Reply{Pod: pod, Remote: remote, Local: local, Mark: mark}
	}
	mark := redirect.DefaultDeliverMark
	for _, tc := range []struct {
		name  string
		r     workload.Reply
		probe error
		ok    bool
	}{
		{"transparent: client's address and the delivery mark", reply("10.244.1.2:40000", "10.244.2.2:8080", mark), transparent, true},
		{"transparent: no mark (a direct connection)", reply("10.244.1.2:40000", "10.244.2.2:8080", 0), transparent, false},
		{"transparent: the pod's own address (the fallback where it should not be)", reply("10.244.2.2:40000", "10.244.2.2:8080", 0), transparent, false},
		{"transparent: another answering pod", workload.Reply{Pod: "shop/web-1", Remote: "10.244.1.2:1", Local: "10.244.2.2:8080", Mark: mark}, transparent, false},
		{"fallback: the pod's own address", reply("10.244.2.2:40000", "10.244.2.2:8080", 0), fallback, true},
		{"fallback: the pod's own IPv6 address", reply("[fd00:10:244:2::2]:40000", "[fd00:10:244:2::2]:8080", 0), fallback, true},
		{"fallback: the client's address (not the agent's delivery)", reply("10.244.1.2:40000", "10.244.2.2:8080", 0), fallback, false},
		{"the probe failed", reply("10.244.1.2:40000", "10.244.2.2:8080", mark), errors.New("probing transparent delivery: operation not permitted"), false},
	} {
		err := checkDelivered(tc.r, pod, client, tc.probe)
		if (err == nil) != tc.ok {
			t.Errorf("%s: %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}
