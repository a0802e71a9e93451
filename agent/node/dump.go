package node

import (
	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/state"
)

// stateDump is the "state" section of the config dump.
type stateDump struct {
	Version         uint64 `json:"version"`
	Synced          bool   `json:"synced"`
	TrustDomain     string `json:"trustDomain"`
	Pods            int    `json:"pods"`
	Services        int    `json:"services"`
	EndpointSlices  int    `json:"endpointSlices"`
	Namespaces      int    `json:"namespaces"`
	NetworkPolicies int    `json:"networkPolicies"`
	CustomObjects   int    `json:"customObjects"`
}

// serviceDump is one service of the "services" section.
type serviceDump struct {
	*state.Service
	Backends map[string][]state.Backend `json:"backends"` // by port name
}

func addStateDumps(s *admin.Server, st *state.Store, node string) {
	s.AddDump("state", func() any {
		snap := st.Snapshot()
		d := stateDump{Version: snap.Version(), Synced: snap.Synced(), TrustDomain: snap.TrustDomain().Name(),
			Pods: len(snap.Pods()), Services: len(snap.Services()), EndpointSlices: len(snap.EndpointSlices()),
			Namespaces: len(snap.Namespaces()), NetworkPolicies: len(snap.NetworkPolicies(""))}
		for _, gk := range snap.ObjectKinds() {
			d.CustomObjects += len(snap.Objects(gk))
		}
		return d
	})
	// workloads: the pods of this node, the ones the agent serves.
	s.AddDump("workloads", func() any {
		pods := st.Snapshot().PodsOnNode(node)
		if pods == nil {
			return []*state.Pod{}
		}
		return pods
	})
	s.AddDump("services", func() any {
		snap := st.Snapshot()
		out := []serviceDump{}
		for _, svc := range snap.Services() {
			d := serviceDump{Service: svc, Backends: map[string][]state.Backend{}}
			for _, p := range svc.Ports {
				if bs := snap.Backends(svc, p); len(bs) > 0 {
					d.Backends[p.Name] = bs
				}
			}
			out = append(out, d)
		}
		return out
	})
}
