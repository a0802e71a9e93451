package node

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/cni"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/workloads"
)

func TestCNISkip(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/a")
	ip := []netip.Addr{netip.MustParseAddr("10.244.1.9")}
	pod := func(f func(p *state.Pod)) *state.Pod {
		p := &state.Pod{Namespace: "demo", Name: "a", UID: "u", Node: "self", Enrolled: true, Phase: state.PodPending, Identity: id}
		if f != nil {
			f(p)
		}
		return p
	}
	m := &mesh{filter: workloads.Filter{Node: "self"}}
	only := &mesh{filter: workloads.Filter{Node: "self", Only: map[string]bool{"demo/b": true}}}
	withIPs := cni.Sandbox{Request: cni.Request{IPs: ip}}
	for _, tc := range []struct {
		name    string
		m       *mesh
		p       *state.Pod
		sb      cni.Sandbox
		skip    string // substring; "" = enroll
		wantErr string
	}{
		{"meshed pod, address from the CNI result", m, pod(nil), withIPs, "", ""},
		{"meshed pod, address in the API", m, pod(func(p *state.Pod) { p.IPs = ip }), cni.Sandbox{}, "", ""},
		{"namespace not enrolled", m, pod(func(p *state.Pod) { p.Enrolled = false }), withIPs, "not in the mesh", ""},
		{"host network", m, pod(func(p *state.Pod) { p.HostNetwork = true }), withIPs, "host network", ""},
		{"terminating", m, pod(func(p *state.Pod) { p.Terminating = true }), withIPs, "terminating", ""},
		{"finished", m, pod(func(p *state.Pod) { p.Phase = state.PodSucceeded }), withIPs, "finished", ""},
		{"another agent's pod", only, pod(nil), withIPs, "--only-pod", ""},
		{"another node", m, pod(func(p *state.Pod) { p.Node = "other" }), withIPs, "", `on node "other"`},
		{"no address anywhere", m, pod(nil), cni.Sandbox{}, "", "no pod address"},
		{"no identity", m, pod(func(p *state.Pod) { p.Identity = spiffeid.ID{} }), withIPs, "", "no SPIFFE identity"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			skip, err := tc.m.cniSkip(tc.p, tc.sb)
			switch {
			case tc.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
			case err != nil:
				t.Fatalf("unexpected error %v", err)
			case tc.skip == "" && skip != "":
				t.Fatalf("skipped (%s), want enrolled", skip)
			case !strings.Contains(skip, tc.skip):
				t.Fatalf("skip %q, want %q", skip, tc.skip)
			}
		})
	}
}
