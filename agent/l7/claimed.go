package l7

import (
	"slices"

	"github.com/nodemesh/nodemesh/agent/state"
)

// ClaimedPorts returns, for each pod that backs an opted-in Service, the
// target ports handled at L7 and their protocol: what the destination
// agent parses. A port of a Service that declares a non-HTTP appProtocol,
// or is not TCP, is not claimed. When two Services target one port, a
// declared protocol wins over detection. The result is nil when nothing
// has opted in.
func ClaimedPorts(snap *state.Snapshot) map[state.Key]map[uint16]Protocol {
	var ports map[state.Key]map[uint16]Protocol
	// The agent refreshes this on every state change: filter first (few
	// Services opt in), then sort only those, for the declared-wins rule's
	// order.
	var opted []*state.Service
	for svc := range snap.AllServices() {
		if ServiceOptedIn(snap, svc) {
			opted = append(opted, svc)
		}
	}
	slices.SortFunc(opted, func(a, b *state.Service) int { return a.Key().Compare(b.Key()) })
	for _, svc := range opted {
		for _, sp := range svc.Ports {
			p := DeclaredProtocol(sp.AppProtocol)
			if p == TCP || sp.Protocol != "TCP" {
				continue
			}
			for _, b := range snap.Backends(svc, sp) {
				pod := snap.BackendPod(b)
				if pod == nil {
					continue
				}
				k := pod.Key()
				if ports == nil {
					ports = map[state.Key]map[uint16]Protocol{}
				}
				if ports[k] == nil {
					ports[k] = map[uint16]Protocol{}
				}
				if old, ok := ports[k][b.Addr.Port()]; !ok || old == Undeclared {
					ports[k][b.Addr.Port()] = p
				}
			}
		}
	}
	return ports
}

// ServiceOptedIn reports whether svc is handled at L7, by its own label or
// its namespace's (OptedIn).
func ServiceOptedIn(snap *state.Snapshot, svc *state.Service) bool {
	var nsLabels map[string]string
	if ns := snap.Namespace(svc.Namespace); ns != nil {
		nsLabels = ns.Labels
	}
	return OptedIn(nsLabels, svc.Labels)
}
