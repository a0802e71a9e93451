package state

import (
	"maps"
	"net/netip"
	"reflect"
	"slices"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
)

// buildIndex is what the store keeps beside its last snapshot so that the
// next build can update the indexes a change touches without scanning:
// the claimants of addresses more than one pod (or Service port) claims,
// and the EndpointSlices of each Service. It is mutable and belongs to the
// store; snapshots never see it.
type buildIndex struct {
	// ipClaims lists, for a pod address claimed by two or more pods, every
	// claimant; an address with one claimant is only in podsByIP.
	ipClaims map[netip.Addr][]Key
	// vipClaims does the same for a ClusterIP:port of several Services.
	vipClaims map[netip.AddrPort][]Key
	// slicesOf lists the EndpointSlices labelled with each Service.
	slicesOf map[Key]map[Key]struct{}
	// podsOf lists the pods of each namespace by name, for the one change
	// that touches them all: a flip of the namespace's enrollment.
	podsOf map[string]map[string]struct{}
}

func (x *buildIndex) reset() {
	x.ipClaims = make(map[netip.Addr][]Key)
	x.vipClaims = make(map[netip.AddrPort][]Key)
	x.slicesOf = make(map[Key]map[Key]struct{})
	x.podsOf = make(map[string]map[string]struct{})
}

// build applies the pending changes to base and returns the new snapshot;
// base is not modified. Each change updates the indexes it touches:
//
//   - a pod: its entry, the addresses it had and has (podsByIP), the nodes
//     it was and is on (podsByNode);
//   - a namespace: its entry, and, when its enrollment flips, its pods
//     (found by the namespace's index of pod names);
//   - a Service: its entry, the VIPs it had and has, its backends;
//   - an EndpointSlice: its entry and the backends of the Services it was
//     and is labelled with;
//   - everything else: its entry.
//
// Backends name their pods by key and address (BackendPod resolves them),
// so a pod change does not touch them. Pod input values are shared, never
// modified; the snapshot holds a computed copy of each.
func build(base *Snapshot, pend *pending, idx *buildIndex, version uint64, synced bool) *Snapshot {
	s := &Snapshot{
		version:     version,
		synced:      synced,
		trustDomain: base.trustDomain,
		namespaces:  base.namespaces.Edit(),
		nodes:       base.nodes.Edit(),
		pods:        base.pods.Edit(),
		podsByIP:    base.podsByIP.Edit(),
		podsByNode:  base.podsByNode.Edit(),
		services:    base.services.Edit(),
		vips:        base.vips.Edit(),
		slices:      base.slices.Edit(),
		backends:    base.backends.Edit(),
		netpols:     base.netpols.Edit(),
		objects:     maps.Clone(base.objects),
		lineage:     idx,
	}
	t := &touched{
		namespaces: slices.Collect(maps.Keys(pend.namespaces)),
		nodes:      slices.Collect(maps.Keys(pend.nodes)),
		netpols:    slices.Collect(maps.Keys(pend.netpols)),
		services:   slices.Collect(maps.Keys(pend.services)),
	}
	for gk, changes := range pend.objects {
		if len(changes) > 0 {
			if t.objects == nil {
				t.objects = make(map[GroupKind][]Key)
			}
			t.objects[gk] = slices.Collect(maps.Keys(changes))
		}
	}
	flipped := s.applyNamespaces(base, pend.namespaces)
	applySimple(&s.nodes, pend.nodes)
	applySimple(&s.netpols, pend.netpols)
	for gk, changes := range pend.objects {
		m, ok := s.objects[gk]
		if !ok {
			m = pmap.New[Key, *Object](hashKey)
		}
		m = m.Edit()
		applySimple(&m, changes)
		m.Freeze()
		if m.Len() == 0 {
			delete(s.objects, gk)
		} else {
			s.objects[gk] = m
		}
	}
	s.applyPods(base, pend.pods, flipped, idx, t)
	s.applyServices(base, pend.services, pend.slices, idx, t)
	s.record(base, t, !pend.reset)

	for _, m := range []interface{ Freeze() }{&s.namespaces, &s.nodes, &s.pods, &s.podsByIP, &s.podsByNode,
		&s.services, &s.vips, &s.slices, &s.backends, &s.netpols} {
		m.Freeze()
	}
	return s
}

// applySimple applies changes to a map no other index depends on.
func applySimple[K comparable, V any](m *pmap.Map[K, *V], changes map[K]*V) {
	for k, v := range changes {
		if v == nil {
			m.Del(k)
		} else {
			m.Set(k, v)
		}
	}
}

// podFor returns the snapshot's value for the input pod p. A value new to
// the store is the snapshot's value itself: its computed fields are filled
// in place, since the store owns what it is given and no snapshot holds it
// yet. A value seen before (given again, or to another store) is never
// written again: it is reused when its computed fields are still right,
// else copied.
func (s *Snapshot) podFor(p *Pod) *Pod {
	ns := s.namespaces.Lookup(p.Namespace)
	if !p.computed {
		fillComputed(p, ns, s.trustDomain)
		return p
	}
	c := computePod(p, ns, s.trustDomain)
	if reflect.DeepEqual(c, p) {
		return p
	}
	return c
}

// applyNamespaces returns the namespaces whose enrollment flipped: their
// pods' Enrolled changes.
func (s *Snapshot) applyNamespaces(base *Snapshot, changes map[string]*Namespace) map[string]bool {
	var flipped map[string]bool
	for name, n := range changes {
		old := base.namespaces.Lookup(name)
		was := old != nil && old.Enrolled
		is := false
		if n == nil {
			s.namespaces.Del(name)
		} else {
			c := *n
			c.Enrolled = n.Labels[LabelMode] == ModeEnabled
			is = c.Enrolled
			s.namespaces.Set(name, &c)
		}
		if was != is {
			if flipped == nil {
				flipped = make(map[string]bool)
			}
			flipped[name] = true
		}
	}
	return flipped
}

type podChange struct{ old, new *Pod }

func (s *Snapshot) applyPods(base *Snapshot, pending map[Key]*Pod, flipped map[string]bool, idx *buildIndex, t *touched) {
	changes := make(map[Key]podChange, len(pending))
	for k, p := range pending {
		ch := podChange{old: base.pods.Lookup(k)}
		if p != nil {
			ch.new = s.podFor(p)
		}
		if ch.old != nil || ch.new != nil {
			changes[k] = ch
		}
	}
	// A computed pod holds all of its input, so it recomputes from itself
	// (into a copy when its Enrolled changes).
	for ns := range flipped {
		for name := range idx.podsOf[ns] {
			k := Key{ns, name}
			if _, done := changes[k]; !done {
				p := base.pods.Lookup(k)
				changes[k] = podChange{old: p, new: s.podFor(p)}
			}
		}
	}
	if len(changes) == 0 {
		return
	}
	t.pods = slices.Collect(maps.Keys(changes))
	addrs := make(map[netip.Addr][]Key)
	nodes := make(map[string][]*Pod) // touched nodes: their changed pods' new versions
	touch := func(p *Pod, k Key, isNew bool) {
		if p == nil {
			return
		}
		if p.Node != "" {
			if isNew {
				nodes[p.Node] = append(nodes[p.Node], p)
			} else if _, ok := nodes[p.Node]; !ok {
				nodes[p.Node] = nil
			}
		}
		if !p.HostNetwork {
			for _, ip := range p.IPs {
				addrs[ip] = append(addrs[ip], k)
			}
		}
	}
	for k, ch := range changes {
		if ch.new == nil {
			s.pods.Del(k)
			if names := idx.podsOf[k.Namespace]; names != nil {
				delete(names, k.Name)
				if len(names) == 0 {
					delete(idx.podsOf, k.Namespace)
				}
			}
		} else {
			s.pods.Set(k, ch.new)
			names := idx.podsOf[k.Namespace]
			if names == nil {
				names = make(map[string]struct{})
				idx.podsOf[k.Namespace] = names
			}
			names[k.Name] = struct{}{}
		}
		touch(ch.old, k, false)
		touch(ch.new, k, true)
	}

	// podsByNode: each touched node's list without the changed pods, plus
	// their new versions on it.
	for node, added := range nodes {
		old := base.podsByNode.Lookup(node)
		list := make([]*Pod, 0, len(old)+len(added))
		for _, p := range old {
			if _, changed := changes[p.Key()]; !changed {
				list = append(list, p)
			}
		}
		list = append(list, added...)
		if len(list) == 0 {
			s.podsByNode.Del(node)
			continue
		}
		slices.SortFunc(list, func(a, b *Pod) int { return compareKeys(a.Key(), b.Key()) })
		s.podsByNode.Set(node, slices.Clip(list))
	}

	// podsByIP: each touched address's owner among its claimants, which are
	// its previous claimants and the changed pods that claim it now.
	t.addrs = slices.Collect(maps.Keys(addrs))
	for ip, keys := range addrs {
		cands := append(keys, idx.ipClaims[ip]...)
		if p := base.podsByIP.Lookup(ip); p != nil {
			cands = append(cands, p.Key())
		}
		slices.SortFunc(cands, compareKeys)
		cands = slices.Compact(cands)
		var owner *Pod
		claims := cands[:0]
		for _, k := range cands {
			p := s.pods.Lookup(k)
			if p == nil || p.HostNetwork || !slices.Contains(p.IPs, ip) {
				continue
			}
			claims = append(claims, k)
			if owner == nil || preferPod(p, owner) {
				owner = p
			}
		}
		if owner == nil {
			s.podsByIP.Del(ip)
		} else {
			s.podsByIP.Set(ip, owner)
		}
		if len(claims) > 1 {
			idx.ipClaims[ip] = slices.Clone(claims)
		} else {
			delete(idx.ipClaims, ip)
		}
	}
}

func (s *Snapshot) applyServices(base *Snapshot, services map[Key]*Service, slicesPending map[Key]*EndpointSlice, idx *buildIndex, t *touched) {
	dirty := make(map[Key]bool)
	vipKeys := make(map[netip.AddrPort][]Key)
	touch := func(svc *Service, k Key) {
		if svc == nil {
			return
		}
		for _, p := range svc.Ports {
			if !isTCP(p.Protocol) {
				continue
			}
			for _, ip := range svc.ClusterIPs {
				ap := netip.AddrPortFrom(ip.Unmap(), p.Port)
				vipKeys[ap] = append(vipKeys[ap], k)
			}
		}
	}
	for k, svc := range services {
		old := base.services.Lookup(k)
		if svc == nil {
			s.services.Del(k)
		} else {
			s.services.Set(k, svc)
		}
		touch(old, k)
		touch(svc, k)
		dirty[k] = true
	}
	for k, es := range slicesPending {
		if old := base.slices.Lookup(k); old != nil && old.Service != "" {
			sk := Key{old.Namespace, old.Service}
			delete(idx.slicesOf[sk], k)
			if len(idx.slicesOf[sk]) == 0 {
				delete(idx.slicesOf, sk)
			}
			dirty[sk] = true
		}
		if es == nil {
			s.slices.Del(k)
			continue
		}
		s.slices.Set(k, es)
		if es.Service != "" {
			sk := Key{es.Namespace, es.Service}
			if idx.slicesOf[sk] == nil {
				idx.slicesOf[sk] = make(map[Key]struct{})
			}
			idx.slicesOf[sk][k] = struct{}{}
			dirty[sk] = true
		}
	}

	// VIPs: a ClusterIP:port claimed by several Services belongs to the
	// first by namespace/name (the API server never allocates one twice;
	// static files might).
	for ap, keys := range vipKeys {
		cands := append(keys, idx.vipClaims[ap]...)
		if v, ok := base.vips.Get(ap); ok {
			cands = append(cands, v.svc.Key())
		}
		slices.SortFunc(cands, compareKeys)
		cands = slices.Compact(cands)
		var owner vip
		claims := cands[:0]
		for _, k := range cands {
			svc := s.services.Lookup(k)
			if svc == nil {
				continue
			}
			port := svc.vipPort(ap)
			if port < 0 {
				continue
			}
			claims = append(claims, k)
			if owner.svc == nil { // cands are sorted: the first wins
				owner = vip{svc, port}
			}
		}
		if owner.svc == nil {
			s.vips.Del(ap)
		} else {
			s.vips.Set(ap, owner)
		}
		if len(claims) > 1 {
			idx.vipClaims[ap] = slices.Clone(claims)
		} else {
			delete(idx.vipClaims, ap)
		}
	}

	ports := make(map[servicePortKey]bool)
	for k := range dirty {
		if old := base.services.Lookup(k); old != nil {
			for _, sp := range old.Ports {
				s.backends.Del(servicePortKey{k, sp.Name})
				ports[servicePortKey{k, sp.Name}] = true
			}
		}
		svc := s.services.Lookup(k)
		if svc == nil {
			continue
		}
		for _, sp := range svc.Ports {
			ports[servicePortKey{k, sp.Name}] = true
		}
		list := make([]*EndpointSlice, 0, len(idx.slicesOf[k]))
		for sk := range idx.slicesOf[k] {
			list = append(list, s.slices.Lookup(sk))
		}
		// Slices in a fixed order, so that an endpoint listed twice keeps
		// the same entry whatever the order of changes.
		slices.SortFunc(list, func(a, b *EndpointSlice) int { return compareKeys(a.Key(), b.Key()) })
		for _, sp := range svc.Ports {
			if bs := backendsOf(sp, list); len(bs) > 0 {
				s.backends.Set(servicePortKey{k, sp.Name}, bs)
			}
		}
	}
	t.backends = slices.Collect(maps.Keys(ports))
}

// vipPort is the index of the TCP port that ap names on one of the
// service's ClusterIPs (the last one when several do), or -1.
func (svc *Service) vipPort(ap netip.AddrPort) int {
	if !slices.ContainsFunc(svc.ClusterIPs, func(ip netip.Addr) bool { return ip.Unmap() == ap.Addr() }) {
		return -1
	}
	port := -1
	for i, p := range svc.Ports {
		if isTCP(p.Protocol) && p.Port == ap.Port() {
			port = i
		}
	}
	return port
}

// backendsOf returns the endpoints of a service port from its slices,
// sorted by address: the ready ones, or, when none is ready, the ones still
// serving while terminating. Each address:port appears once.
func backendsOf(sp ServicePort, list []*EndpointSlice) []Backend {
	if !isTCP(sp.Protocol) {
		return nil
	}
	var ready, terminating []Backend
	seen := make(map[netip.AddrPort]bool)
	for _, es := range list {
		if es.AddressType != "" && es.AddressType != "IPv4" && es.AddressType != "IPv6" {
			continue // FQDN slices name hosts, not addresses
		}
		for _, ep := range es.Ports {
			if ep.Name != sp.Name || !isTCP(ep.Protocol) || ep.Port == 0 {
				continue
			}
			for _, e := range es.Endpoints {
				if !e.Ready && !(e.Serving && e.Terminating) {
					continue
				}
				for _, a := range e.Addresses {
					ap := netip.AddrPortFrom(a.Unmap(), ep.Port)
					if seen[ap] {
						continue
					}
					seen[ap] = true
					b := Backend{Addr: ap, Node: e.Node, Terminating: !e.Ready, ref: e.Pod}
					if e.Ready {
						ready = append(ready, b)
					} else {
						terminating = append(terminating, b)
					}
				}
			}
		}
	}
	out := ready
	if len(out) == 0 {
		out = terminating
	}
	slices.SortFunc(out, func(a, b Backend) int { return a.Addr.Compare(b.Addr) })
	return slices.Clip(out)
}
