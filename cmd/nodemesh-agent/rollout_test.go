package main

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

func TestMeshEndpoint(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/default")
	addr := netip.MustParseAddrPort("10.0.1.5:8080")
	pod := func(node string, enrolled bool, exclude ...uint16) *state.Pod {
		p := &state.Pod{Namespace: "a", Name: "p", Node: node, Enrolled: enrolled, ExcludeInboundPorts: exclude, Ref: "a/p"}
		if enrolled {
			p.Identity = id
		}
		return p
	}
	capable := func(node string) bool { return node == "meshed" }
	for _, tc := range []struct {
		name         string
		p            *state.Pod
		strict       bool
		wantHBONE    bool
		wantRefused  bool
		wantWorkload string
	}{
		{name: "not a pod", p: nil},
		{name: "unenrolled pod on a meshed node", p: pod("meshed", false), wantWorkload: "a/p"},
		{name: "enrolled pod on a meshed node", p: pod("meshed", true), wantHBONE: true, wantWorkload: "a/p"},
		{name: "enrolled STRICT pod on a meshed node", p: pod("meshed", true), strict: true, wantHBONE: true, wantWorkload: "a/p"},
		{name: "enrolled PERMISSIVE pod on a node without agent", p: pod("bare", true), wantWorkload: "a/p"},
		{name: "enrolled STRICT pod on a node without agent", p: pod("bare", true), strict: true, wantRefused: true, wantWorkload: "a/p"},
		{name: "excluded port on a node without agent", p: pod("bare", true, 8080), strict: true, wantWorkload: "a/p"},
	} {
		var asked bool
		ep, err := meshEndpoint(addr, tc.p, capable, func(pod string, port uint16) bool {
			asked = true
			if pod != "a/p" || port != 8080 {
				t.Errorf("%s: strict asked for %s port %d", tc.name, pod, port)
			}
			return tc.strict
		})
		if tc.wantRefused {
			if !errors.Is(err, proxy.ErrStrictMTLS) {
				t.Errorf("%s: err = %v, want refusal", tc.name, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if ep.Enrolled != tc.wantHBONE || ep.Addr != addr || ep.Workload != tc.wantWorkload {
			t.Errorf("%s: endpoint %+v", tc.name, ep)
		}
		if ep.Enrolled && ep.Identity != id {
			t.Errorf("%s: identity %v", tc.name, ep.Identity)
		}
		if tc.wantHBONE && asked {
			t.Errorf("%s: asked for the mode of an HBONE destination", tc.name)
		}
	}
}

func TestMeshCapableWithoutPeers(t *testing.T) {
	a := &agent{cfg: &Config{NodeName: "self"}}
	if !a.meshCapable("other") || !a.meshCapable("self") {
		t.Error("without an API server every node must count as mesh-capable (HBONE, failing closed)")
	}
}
