package state

import (
	"net/netip"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
)

// Changes lists what differs between two snapshots of one store: the
// objects added, replaced (a new value) or removed. A consumer that keeps
// its own index of the state (agent/policy/fromstate, agent/l7,
// agent/telemetry) updates only these.
type Changes struct {
	Namespaces      []string
	Nodes           []string
	Pods            []Key
	NetworkPolicies []Key
	Objects         map[GroupKind][]Key
	// Addresses are the pod addresses whose owner (PodByIP) changed; a pod
	// that kept its value may have gained or lost one.
	Addresses []netip.Addr
	// Services are the Services whose own value changed.
	Services []Key
	// Backends are the Services the backends of some port of which
	// changed (Backends), each once: a Service changed, or an
	// EndpointSlice labelled with it. BackendPod may also resolve an
	// unchanged backend to another pod: when the pod it references
	// (Pods) or the owner of its address (Addresses) changed.
	Backends []Key
}

// ChangesSince returns what changed from old to s, where old is an
// earlier snapshot of the same store, or nil for everything in s.
//
// A snapshot remembers which keys the last few builds before it touched
// (history), so when old is one of those builds' bases the cost is that of
// the changes: each touched key is looked up in both snapshots and
// reported if its value differs. Otherwise (an older snapshot, a Reset in
// between, a build that touched too much to remember) it compares the two
// snapshots' maps: they share every shard no change touched, so the cost
// is that of the shards that differ, a few hundred entries per change at
// 100,000 pods, not of the cluster (but everything differs after a Reset).
// Both give the same answer (TestIncrementalMatchesFullRebuild).
func (s *Snapshot) ChangesSince(old *Snapshot) Changes {
	if old != nil && s.lineage != nil && old.lineage == s.lineage {
		for i, d := range s.history {
			if d.from == old.version {
				return s.changesFrom(old, s.history[i:])
			}
		}
	}
	return s.diffSince(old)
}

// diffSince is ChangesSince by comparing the snapshots' maps.
func (s *Snapshot) diffSince(old *Snapshot) Changes {
	if old == nil {
		old = emptySnapshot(s.trustDomain)
	}
	var c Changes
	diff(&s.namespaces, &old.namespaces, func(k string) { c.Namespaces = append(c.Namespaces, k) })
	diff(&s.nodes, &old.nodes, func(k string) { c.Nodes = append(c.Nodes, k) })
	diff(&s.pods, &old.pods, func(k Key) { c.Pods = append(c.Pods, k) })
	s.podsByIP.Diff(&old.podsByIP, func(a, b *Pod) bool { return a == b }, func(a netip.Addr) { c.Addresses = append(c.Addresses, a) })
	diff(&s.netpols, &old.netpols, func(k Key) { c.NetworkPolicies = append(c.NetworkPolicies, k) })
	diff(&s.services, &old.services, func(k Key) { c.Services = append(c.Services, k) })
	var backends map[Key]bool
	s.backends.Diff(&old.backends, sameBackends, func(k servicePortKey) {
		if backends == nil {
			backends = make(map[Key]bool)
		}
		if !backends[k.svc] {
			backends[k.svc] = true
			c.Backends = append(c.Backends, k.svc)
		}
	})
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

// sameBackends reports whether two backend lists are one (a build gives
// a port that changed a new list).
func sameBackends(a, b []Backend) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// historyDepth is how many builds a snapshot remembers the touched keys
// of: the agent's consumers (policy, L7, telemetry) each see most
// snapshots, but a connection asking for the state may build one they
// never see in between.
const historyDepth = 8

// maxTouched bounds the keys one build's record may hold; a build that
// touched more (the initial sync, a Reset, a namespace's enrollment flip
// in a large namespace) is not remembered, and ChangesSince across it
// compares the maps instead. It keeps the records small: they live as
// long as the next historyDepth snapshots.
const maxTouched = 4096

// delta is one build's record: the keys it touched (a superset of those
// whose value changed) on top of the snapshot of version from.
type delta struct {
	from uint64
	t    *touched
}

// touched lists the keys one build set or deleted in each map.
type touched struct {
	namespaces []string
	nodes      []string
	pods       []Key
	addrs      []netip.Addr
	netpols    []Key
	services   []Key
	backends   []servicePortKey
	objects    map[GroupKind][]Key
}

func (t *touched) size() int {
	n := len(t.namespaces) + len(t.nodes) + len(t.pods) + len(t.addrs) + len(t.netpols) + len(t.services) + len(t.backends)
	for _, ks := range t.objects {
		n += len(ks)
	}
	return n
}

// record sets s.history: base's records (the last historyDepth-1) and
// this build's, or none when this build is not to be remembered.
func (s *Snapshot) record(base *Snapshot, t *touched, remember bool) {
	if !remember || t.size() > maxTouched {
		return
	}
	h := base.history
	if len(h) >= historyDepth {
		h = h[len(h)-historyDepth+1:]
	}
	s.history = append(append(make([]delta, 0, len(h)+1), h...), delta{from: base.version, t: t})
}

// changesFrom is ChangesSince from the records ds, which lead from old to
// s: each touched key is reported when its value in old and s differs.
func (s *Snapshot) changesFrom(old *Snapshot, ds []delta) Changes {
	var c Changes
	c.Namespaces = collect(ds, func(t *touched) []string { return t.namespaces },
		func(k string) bool { return old.namespaces.Lookup(k) != s.namespaces.Lookup(k) })
	c.Nodes = collect(ds, func(t *touched) []string { return t.nodes },
		func(k string) bool { return old.nodes.Lookup(k) != s.nodes.Lookup(k) })
	c.Pods = collect(ds, func(t *touched) []Key { return t.pods },
		func(k Key) bool { return old.pods.Lookup(k) != s.pods.Lookup(k) })
	c.Addresses = collect(ds, func(t *touched) []netip.Addr { return t.addrs },
		func(a netip.Addr) bool { return old.podsByIP.Lookup(a) != s.podsByIP.Lookup(a) })
	c.NetworkPolicies = collect(ds, func(t *touched) []Key { return t.netpols },
		func(k Key) bool { return old.netpols.Lookup(k) != s.netpols.Lookup(k) })
	c.Services = collect(ds, func(t *touched) []Key { return t.services },
		func(k Key) bool { return old.services.Lookup(k) != s.services.Lookup(k) })
	ports := collect(ds, func(t *touched) []servicePortKey { return t.backends }, func(k servicePortKey) bool {
		a, okA := old.backends.Get(k)
		b, okB := s.backends.Get(k)
		return okA != okB || !sameBackends(a, b)
	})
	seen := make(map[Key]bool, len(ports))
	for _, k := range ports {
		if !seen[k.svc] {
			seen[k.svc] = true
			c.Backends = append(c.Backends, k.svc)
		}
	}
	kinds := map[GroupKind]bool{}
	for _, d := range ds {
		for gk := range d.t.objects {
			kinds[gk] = true
		}
	}
	for gk := range kinds {
		ks := collect(ds, func(t *touched) []Key { return t.objects[gk] },
			func(k Key) bool { return old.Object(gk, k) != s.Object(gk, k) })
		if len(ks) > 0 {
			if c.Objects == nil {
				c.Objects = make(map[GroupKind][]Key)
			}
			c.Objects[gk] = ks
		}
	}
	return c
}

// collect returns the keys of ds (by get) for which changed holds, each
// once.
func collect[K comparable](ds []delta, get func(*touched) []K, changed func(K) bool) []K {
	var out []K
	var seen map[K]bool
	if len(ds) > 1 {
		seen = make(map[K]bool)
	}
	for _, d := range ds {
		for _, k := range get(d.t) {
			if seen != nil {
				if seen[k] {
					continue
				}
				seen[k] = true
			}
			if changed(k) {
				out = append(out, k)
			}
		}
	}
	return out
}
