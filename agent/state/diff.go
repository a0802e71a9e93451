package state

import (
	"net/netip"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
)

// Changes lists what differs between two snapshots of one store: the
// objects added, replaced (a new value) or removed. A consumer that keeps
// its own index of the state (agent/policy/fromstate) updates only these.
type Changes struct {
	Namespaces      []string
	Nodes           []string
	Pods            []Key
	NetworkPolicies []Key
	Objects         map[GroupKind][]Key
	// Addresses are the pod addresses whose owner (PodByIP) changed; a pod
	// that kept its value may have gained or lost one.
	Addresses []netip.Addr
}

// ChangesSince returns what changed from old to s, where old is an
// earlier snapshot of the same store, or nil for everything in s. The
// snapshots share every shard of their maps that no change touched, so the
// cost is that of the shards that differ, not of the cluster (it does not
// follow a Reset cheaply: everything differs then).
func (s *Snapshot) ChangesSince(old *Snapshot) Changes {
	if old == nil {
		old = emptySnapshot(s.trustDomain)
	}
	var c Changes
	diff(&s.namespaces, &old.namespaces, func(k string) { c.Namespaces = append(c.Namespaces, k) })
	diff(&s.nodes, &old.nodes, func(k string) { c.Nodes = append(c.Nodes, k) })
	diff(&s.pods, &old.pods, func(k Key) { c.Pods = append(c.Pods, k) })
	diff(&s.podsByIP, &old.podsByIP, func(a netip.Addr) { c.Addresses = append(c.Addresses, a) })
	diff(&s.netpols, &old.netpols, func(k Key) { c.NetworkPolicies = append(c.NetworkPolicies, k) })
	for gk := range s.objects {
		c.objectsOf(gk, s, old)
	}
	for gk := range old.objects {
		if _, ok := s.objects[gk]; !ok {
			c.objectsOf(gk, s, old)
		}
	}
	return c
}

func (c *Changes) objectsOf(gk GroupKind, s, old *Snapshot) {
	a, b := old.objects[gk], s.objects[gk]
	diff(&b, &a, func(k Key) {
		if c.Objects == nil {
			c.Objects = make(map[GroupKind][]Key)
		}
		c.Objects[gk] = append(c.Objects[gk], k)
	})
}

func diff[K comparable, V any](m, old *pmap.Map[K, *V], changed func(K)) {
	m.Diff(old, func(a, b *V) bool { return a == b }, changed)
}
