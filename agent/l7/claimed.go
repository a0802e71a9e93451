package l7

import (
	"net/netip"
	"slices"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
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

// ClaimIndex keeps ClaimedPorts' answer for the successive snapshots of
// one store, updating only what changed (issue 18: the agent asks on every
// state change, and at 5,000 Services a pass over them all was most of its
// CPU under churn). A pod's claims depend on the opted-in Services whose
// backends resolve to it, so the index keeps, per opted-in Service, the
// claims it makes and what its backends resolve through (the pods they
// reference, their addresses), and recomputes a Service when it, its
// backends, its namespace's opt-in, or what its backends resolve through
// changed (state.Snapshot.ChangesSince), then the pods whose claims that
// moved. TestClaimIndexMatchesClaimedPorts compares it with ClaimedPorts
// over thousands of random changes.
//
// The zero ClaimIndex is ready to use. It is not safe for concurrent use;
// the Claims it returns are immutable.
type ClaimIndex struct {
	prev  *state.Snapshot
	opted map[state.Key]*serviceClaims
	// byRef, byAddr: the opted-in Services whose backends reference a pod
	// key or have an address, resolved or not, since either's change can
	// resolve a backend to another pod (state.Snapshot.BackendPod).
	byRef  map[state.Key]map[state.Key]struct{}
	byAddr map[netip.Addr]map[state.Key]struct{}
	// byPod: the opted-in Services claiming a port of a pod.
	byPod map[state.Key]map[state.Key]struct{}
	ports pmap.Map[state.Key, map[uint16]Protocol]
}

// Claims is one version of a ClaimIndex: the ports handled at L7 of each
// pod, as ClaimedPorts gives them. The zero Claims claims nothing.
type Claims struct {
	ports pmap.Map[state.Key, map[uint16]Protocol]
}

// Port returns the protocol a pod's port is handled with at L7, and
// whether it is.
func (c *Claims) Port(pod state.Key, port uint16) (Protocol, bool) {
	p, ok := c.ports.Lookup(pod)[port]
	return p, ok
}

// Pods is the number of pods with a claimed port.
func (c *Claims) Pods() int { return c.ports.Len() }

// serviceClaims is what one opted-in Service claims, in ClaimedPorts'
// order (its ports, then their backends), and what its backends resolve
// through.
type serviceClaims struct {
	claims []claim
	refs   []state.Key
	addrs  []netip.Addr
}

type claim struct {
	pod   state.Key
	port  uint16
	proto Protocol
}

func hashKey(k state.Key) uint64 { return pmap.Mix(pmap.String(k.Namespace) ^ pmap.String(k.Name)*31) }

// Update brings the index to snap, a snapshot of the same store as the
// previous call's (or the first), and returns its claims.
func (x *ClaimIndex) Update(snap *state.Snapshot) Claims {
	dirty := make(map[state.Key]bool)
	if x.prev == nil {
		x.opted = make(map[state.Key]*serviceClaims)
		x.byRef = make(map[state.Key]map[state.Key]struct{})
		x.byAddr = make(map[netip.Addr]map[state.Key]struct{})
		x.byPod = make(map[state.Key]map[state.Key]struct{})
		x.ports = pmap.New[state.Key, map[uint16]Protocol](hashKey)
		for svc := range snap.AllServices() {
			dirty[svc.Key()] = true
		}
	} else {
		c := snap.ChangesSince(x.prev)
		for _, k := range c.Services {
			dirty[k] = true
		}
		for _, k := range c.Backends {
			if x.opted[k] != nil {
				dirty[k] = true
			}
		}
		for _, k := range c.Pods {
			for s := range x.byRef[k] {
				dirty[s] = true
			}
		}
		for _, a := range c.Addresses {
			for s := range x.byAddr[a] {
				dirty[s] = true
			}
		}
		// A namespace whose opt-in flips changes its Services that do not
		// decide for themselves; rare, so found by a pass over them all.
		for _, ns := range c.Namespaces {
			if namespaceOptsIn(x.prev, ns) == namespaceOptsIn(snap, ns) {
				continue
			}
			for svc := range snap.AllServices() {
				if svc.Namespace == ns {
					dirty[svc.Key()] = true
				}
			}
			for k := range x.opted {
				if k.Namespace == ns {
					dirty[k] = true
				}
			}
		}
	}
	x.prev = snap
	if len(dirty) == 0 {
		return Claims{x.ports}
	}
	pods := make(map[state.Key]bool)
	for k := range dirty {
		old := x.opted[k]
		var now *serviceClaims
		if svc := snap.Service(k.Namespace, k.Name); svc != nil && ServiceOptedIn(snap, svc) {
			now = claimsOf(snap, svc)
		}
		if old == nil && now == nil {
			continue
		}
		x.index(k, old, false)
		x.index(k, now, true)
		if now == nil {
			delete(x.opted, k)
		} else {
			x.opted[k] = now
		}
		for _, sc := range []*serviceClaims{old, now} {
			if sc != nil {
				for _, c := range sc.claims {
					pods[c.pod] = true
				}
			}
		}
	}
	if len(pods) == 0 {
		return Claims{x.ports}
	}
	x.ports = x.ports.Edit()
	for pod := range pods {
		if m := x.podClaims(pod); m != nil {
			x.ports.Set(pod, m)
		} else {
			x.ports.Del(pod)
		}
	}
	x.ports.Freeze()
	return Claims{x.ports}
}

// namespaceOptsIn reports whether namespace ns opts its Services in.
func namespaceOptsIn(snap *state.Snapshot, ns string) bool {
	n := snap.Namespace(ns)
	return n != nil && OptedIn(n.Labels, nil)
}

// claimsOf lists what the opted-in svc claims in snap.
func claimsOf(snap *state.Snapshot, svc *state.Service) *serviceClaims {
	sc := &serviceClaims{}
	for _, sp := range svc.Ports {
		p := DeclaredProtocol(sp.AppProtocol)
		if p == TCP || sp.Protocol != "TCP" {
			continue
		}
		for _, b := range snap.Backends(svc, sp) {
			if k, ok := b.PodRef(); ok {
				sc.refs = append(sc.refs, k)
			}
			sc.addrs = append(sc.addrs, b.Addr.Addr())
			if pod := snap.BackendPod(b); pod != nil {
				sc.claims = append(sc.claims, claim{pod.Key(), b.Addr.Port(), p})
			}
		}
	}
	return sc
}

// index adds (add) or removes Service k's entries of sc in the reverse
// indexes.
func (x *ClaimIndex) index(k state.Key, sc *serviceClaims, add bool) {
	if sc == nil {
		return
	}
	for _, r := range sc.refs {
		setMember(x.byRef, r, k, add)
	}
	for _, a := range sc.addrs {
		setMember(x.byAddr, a, k, add)
	}
	for _, c := range sc.claims {
		setMember(x.byPod, c.pod, k, add)
	}
}

func setMember[K comparable](m map[K]map[state.Key]struct{}, k K, svc state.Key, add bool) {
	set := m[k]
	if add {
		if set == nil {
			set = make(map[state.Key]struct{}, 1)
			m[k] = set
		}
		set[svc] = struct{}{}
		return
	}
	delete(set, svc)
	if len(set) == 0 {
		delete(m, k)
	}
}

// podClaims computes a pod's claimed ports from the opted-in Services
// claiming on it, in ClaimedPorts' order and by its rule; nil for none.
func (x *ClaimIndex) podClaims(pod state.Key) map[uint16]Protocol {
	svcs := make([]state.Key, 0, len(x.byPod[pod]))
	for k := range x.byPod[pod] {
		svcs = append(svcs, k)
	}
	slices.SortFunc(svcs, state.Key.Compare)
	var ports map[uint16]Protocol
	for _, k := range svcs {
		for _, c := range x.opted[k].claims {
			if c.pod != pod {
				continue
			}
			if ports == nil {
				ports = make(map[uint16]Protocol)
			}
			if old, ok := ports[c.port]; !ok || old == Undeclared {
				ports[c.port] = c.proto
			}
		}
	}
	return ports
}
