package state

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
)

// model is the cluster as a test sees it: the inputs last set.
type model struct {
	namespaces map[string]*Namespace
	nodes      map[string]*Node
	pods       map[Key]*Pod
	services   map[Key]*Service
	slices     map[Key]*EndpointSlice
	netpols    map[Key]*NetworkPolicy
	objects    map[GroupKind]map[Key]*Object
}

func newModel() *model {
	return &model{map[string]*Namespace{}, map[string]*Node{}, map[Key]*Pod{}, map[Key]*Service{},
		map[Key]*EndpointSlice{}, map[Key]*NetworkPolicy{}, map[GroupKind]map[Key]*Object{}}
}

// reference is the full rebuild the store did before it was incremental,
// written out plainly: it indexes every input from scratch. Where the old
// rebuild's result depended on map order (two Services claiming one VIP,
// one endpoint listed by two slices), it takes the rule the store now
// documents.
type reference struct {
	namespaces map[string]*Namespace
	pods       map[Key]*Pod
	podsByIP   map[netip.Addr]*Pod
	podsByNode map[string][]*Pod
	vips       map[netip.AddrPort]vip
	backends   map[servicePortKey][]Backend
}

func referenceBuild(m *model, td spiffeid.TrustDomain) *reference {
	r := &reference{
		namespaces: map[string]*Namespace{}, pods: map[Key]*Pod{}, podsByIP: map[netip.Addr]*Pod{},
		podsByNode: map[string][]*Pod{}, vips: map[netip.AddrPort]vip{}, backends: map[servicePortKey][]Backend{},
	}
	for name, n := range m.namespaces {
		c := *n
		c.Enrolled = n.Labels[LabelMode] == ModeEnabled
		r.namespaces[name] = &c
	}
	for k, p := range m.pods {
		c := computePod(p, r.namespaces[p.Namespace], td)
		r.pods[k] = c
		if c.Node != "" {
			r.podsByNode[c.Node] = append(r.podsByNode[c.Node], c)
		}
		if c.HostNetwork {
			continue
		}
		for _, ip := range c.IPs {
			if old, ok := r.podsByIP[ip]; !ok || preferPod(c, old) {
				r.podsByIP[ip] = c
			}
		}
	}
	for _, list := range r.podsByNode {
		slices.SortFunc(list, func(a, b *Pod) int { return compareKeys(a.Key(), b.Key()) })
	}
	svcs := sortedKeys(m.services)
	for _, k := range svcs {
		svc := m.services[k]
		for i, p := range svc.Ports {
			if !isTCP(p.Protocol) {
				continue
			}
			for _, ip := range svc.ClusterIPs {
				ap := netip.AddrPortFrom(ip.Unmap(), p.Port)
				if old, ok := r.vips[ap]; !ok || old.svc == svc {
					r.vips[ap] = vip{svc, i}
				}
			}
		}
	}
	bySvc := map[Key][]*EndpointSlice{}
	for _, k := range sortedKeys(m.slices) {
		es := m.slices[k]
		if es.Service != "" {
			sk := Key{es.Namespace, es.Service}
			bySvc[sk] = append(bySvc[sk], es)
		}
	}
	for k, list := range bySvc {
		svc := m.services[k]
		if svc == nil {
			continue
		}
		for _, sp := range svc.Ports {
			if !isTCP(sp.Protocol) {
				continue
			}
			var ready, terminating []Backend
			seen := map[netip.AddrPort]bool{}
			for _, es := range list {
				if es.AddressType != "" && es.AddressType != "IPv4" && es.AddressType != "IPv6" {
					continue
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
			if len(out) == 0 {
				continue
			}
			slices.SortFunc(out, func(a, b Backend) int { return a.Addr.Compare(b.Addr) })
			r.backends[servicePortKey{k, sp.Name}] = out
		}
	}
	return r
}

func sortedKeys[V any](m map[Key]V) []Key {
	out := make([]Key, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.SortFunc(out, compareKeys)
	return out
}

// compareWithReference reports every difference between a snapshot and
// the reference rebuild of the same inputs.
func compareWithReference(s *Snapshot, m *model, r *reference) []string {
	var diffs []string
	bad := func(format string, args ...any) { diffs = append(diffs, fmt.Sprintf(format, args...)) }

	checkPmap(&s.namespaces, bad, "namespaces")
	checkPmap(&s.nodes, bad, "nodes")
	checkPmap(&s.pods, bad, "pods")
	checkPmap(&s.podsByIP, bad, "podsByIP")
	checkPmap(&s.podsByNode, bad, "podsByNode")
	checkPmap(&s.services, bad, "services")
	checkPmap(&s.vips, bad, "vips")
	checkPmap(&s.slices, bad, "slices")
	checkPmap(&s.backends, bad, "backends")
	checkPmap(&s.netpols, bad, "netpols")

	if s.namespaces.Len() != len(r.namespaces) {
		bad("%d namespaces, want %d", s.namespaces.Len(), len(r.namespaces))
	}
	for name, want := range r.namespaces {
		if got := s.Namespace(name); got == nil || !reflect.DeepEqual(*got, *want) {
			bad("namespace %s: %+v, want %+v", name, got, want)
		}
	}
	samePointers(bad, "node", &s.nodes, m.nodes)
	samePointers(bad, "service", &s.services, m.services)
	samePointers(bad, "slice", &s.slices, m.slices)
	samePointers(bad, "netpol", &s.netpols, m.netpols)
	kinds := 0
	for gk, objs := range m.objects {
		if len(objs) == 0 {
			continue
		}
		kinds++
		got, ok := s.objects[gk]
		if !ok {
			bad("object kind %s missing", gk)
			continue
		}
		samePointers(bad, "object "+gk.String(), &got, objs)
	}
	if len(s.objects) != kinds {
		bad("%d object kinds, want %d", len(s.objects), kinds)
	}

	if s.pods.Len() != len(r.pods) {
		bad("%d pods, want %d", s.pods.Len(), len(r.pods))
	}
	for k, want := range r.pods {
		if got := s.pods.Lookup(k); got == nil || !reflect.DeepEqual(*got, *want) {
			bad("pod %s: %+v, want %+v", k, got, want)
		}
	}
	// Every index holds the snapshot's own pod values, never an older
	// version of a pod.
	own := func(where string, p *Pod) {
		if p != s.pods.Lookup(p.Key()) {
			bad("%s holds a pod %s that is not the snapshot's", where, p.Key())
		}
	}
	if s.podsByIP.Len() != len(r.podsByIP) {
		bad("%d addresses, want %d", s.podsByIP.Len(), len(r.podsByIP))
	}
	for ip, want := range r.podsByIP {
		got := s.podsByIP.Lookup(ip) // raw: PodByIP unmaps its argument
		if got == nil || got.Key() != want.Key() {
			bad("PodByIP(%s) = %v, want %s", ip, keyOf(got), want.Key())
			continue
		}
		own("podsByIP", got)
	}
	if s.podsByNode.Len() != len(r.podsByNode) {
		bad("%d nodes with pods, want %d", s.podsByNode.Len(), len(r.podsByNode))
	}
	for node, want := range r.podsByNode {
		got := s.PodsOnNode(node)
		if !slices.EqualFunc(got, want, func(a, b *Pod) bool { return a.Key() == b.Key() }) {
			bad("PodsOnNode(%s) = %v, want %v", node, keysOf(got), keysOf(want))
		}
		for _, p := range got {
			own("podsByNode", p)
		}
	}
	if s.vips.Len() != len(r.vips) {
		bad("%d VIPs, want %d", s.vips.Len(), len(r.vips))
	}
	for ap, want := range r.vips {
		got, ok := s.vips.Get(ap)
		if !ok || got.svc != want.svc || got.port != want.port {
			bad("VIP %s: %v, want %s port %d", ap, got, want.svc.Key(), want.port)
		}
	}
	if s.backends.Len() != len(r.backends) {
		bad("%d backend lists, want %d", s.backends.Len(), len(r.backends))
	}
	for k, want := range r.backends {
		got := s.backends.Lookup(k)
		if !slices.EqualFunc(got, want, func(a, b Backend) bool {
			return a.Addr == b.Addr && a.Node == b.Node && a.Terminating == b.Terminating && a.ref == b.ref
		}) {
			bad("backends of %v: %+v, want %+v", k, got, want)
		}
		for _, b := range got {
			// The pod a backend resolves to is the reference's.
			var wantPod *Pod
			if b.ref != nil {
				wantPod = r.pods[*b.ref]
			}
			if wantPod == nil {
				wantPod = r.podsByIP[b.Addr.Addr()]
			}
			if gotPod := s.BackendPod(b); keyOf(gotPod) != keyOf(wantPod) {
				bad("backend %s of %v: pod %v, want %v", b.Addr, k, keyOf(gotPod), keyOf(wantPod))
			}
		}
	}
	return diffs
}

// checkPmap checks a map's own bookkeeping: the count, and that every
// entry is in the shard its hash picks.
func checkPmap(m interface{ Check() error }, bad func(string, ...any), name string) {
	if err := m.Check(); err != nil {
		bad("%s: %v", name, err)
	}
}

func samePointers[K comparable, V any](bad func(string, ...any), what string, got *pmap.Map[K, *V], want map[K]*V) {
	if got.Len() != len(want) {
		bad("%d %ss, want %d", got.Len(), what, len(want))
	}
	for k, v := range want {
		if g := got.Lookup(k); g != v {
			bad("%s %v: not the value set", what, k)
		}
	}
}

func keyOf(p *Pod) any {
	if p == nil {
		return nil
	}
	return p.Key()
}

func keysOf(ps []*Pod) []Key {
	out := make([]Key, len(ps))
	for i, p := range ps {
		out[i] = p.Key()
	}
	return out
}

// TestIncrementalMatchesFullRebuild applies thousands of random changes to
// a small cluster (so that pods share addresses, Services share VIPs,
// slices move between Services, namespaces flip enrollment) through one
// long-lived store, in batches of one or several changes per Update and
// several Updates per Snapshot, and after each Snapshot compares every
// index with a full rebuild of the same inputs. It also checks that the
// snapshot before is unchanged by the build after it.
func TestIncrementalMatchesFullRebuild(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed>>1))
	steps := 3000
	if testing.Short() {
		steps = 500
	}
	s := newStore(t)
	m := newModel()
	var prev *Snapshot
	var prevRef *reference
	var prevModel *model
	var recent []*Snapshot // the last snapshots, oldest first
	for step := range steps {
		for range 1 + rng.IntN(3) {
			s.Update(func(tx *Tx) {
				for range 1 + rng.IntN(4) {
					randomChange(rng, tx, m)
				}
			})
		}
		snap := s.Snapshot()
		ref := referenceBuild(m, td)
		if diffs := compareWithReference(snap, m, ref); len(diffs) > 0 {
			t.Fatalf("seed %d, step %d: the incremental snapshot differs from a full rebuild:\n%s", seed, step, joinLines(diffs))
		}
		if prev != nil {
			if diffs := compareWithReference(prev, prevModel, prevRef); len(diffs) > 0 {
				t.Fatalf("seed %d, step %d: building changed the previous snapshot:\n%s", seed, step, joinLines(diffs))
			}
		}
		// ChangesSince from the snapshots before, through the builds'
		// records where it can, must say what comparing the maps says.
		for i, old := range recent {
			if got, want := sortedChanges(snap.ChangesSince(old)), sortedChanges(snap.diffSince(old)); !reflect.DeepEqual(got, want) {
				t.Fatalf("seed %d, step %d: ChangesSince the snapshot %d builds before = %+v, comparing the maps gives %+v", seed, step, len(recent)-i, got, want)
			}
		}
		recent = append(recent, snap)
		if len(recent) > historyDepth+2 {
			recent = recent[1:]
		}
		prev, prevRef, prevModel = snap, ref, m.clone()
	}
}

// sortedChanges puts c's lists in order, for comparing.
func sortedChanges(c Changes) Changes {
	slices.Sort(c.Namespaces)
	slices.Sort(c.Nodes)
	for _, l := range [][]Key{c.Pods, c.NetworkPolicies, c.Services, c.Backends} {
		slices.SortFunc(l, compareKeys)
	}
	for _, l := range c.Objects {
		slices.SortFunc(l, compareKeys)
	}
	slices.SortFunc(c.Addresses, netip.Addr.Compare)
	return c
}

func joinLines(lines []string) string {
	if len(lines) > 20 {
		lines = append(lines[:20], fmt.Sprintf("... and %d more", len(lines)-20))
	}
	out := ""
	for _, l := range lines {
		out += "  " + l + "\n"
	}
	return out
}

func (m *model) clone() *model {
	c := &model{
		namespaces: cloneMap(m.namespaces), nodes: cloneMap(m.nodes), pods: cloneMap(m.pods),
		services: cloneMap(m.services), slices: cloneMap(m.slices), netpols: cloneMap(m.netpols),
		objects: map[GroupKind]map[Key]*Object{},
	}
	for gk, objs := range m.objects {
		c.objects[gk] = cloneMap(objs)
	}
	return c
}

func cloneMap[K comparable, V any](m map[K]V) map[K]V {
	c := make(map[K]V, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// The universe is small on purpose: collisions are the interesting cases.
var (
	randNamespaces = []string{"a", "b", "c"}
	randNodes      = []string{"n1", "n2", "n3"}
	randAddrs      = []netip.Addr{addr("10.0.0.1"), addr("10.0.0.2"), addr("10.0.0.3"), addr("10.0.0.4"), addr("fd00::1"), addr("::ffff:10.0.0.1")}
	randVIPs       = []netip.Addr{addr("10.96.0.1"), addr("10.96.0.2"), addr("fd00:96::1")}
	randKinds      = []GroupKind{{"security.nodemesh.io", "AuthorizationPolicy"}, {"security.nodemesh.io", "PeerAuthentication"}}
)

func pick[T any](rng *rand.Rand, from []T) T { return from[rng.IntN(len(from))] }

func randKey(rng *rand.Rand, prefix string, n int) Key {
	return Key{pick(rng, randNamespaces), fmt.Sprintf("%s%d", prefix, rng.IntN(n))}
}

func randomChange(rng *rand.Rand, tx *Tx, m *model) {
	del := rng.IntN(4) == 0
	switch r := rng.IntN(100); {
	case r == 0:
		tx.Reset()
		*m = *newModel()
	case r < 8: // namespaces
		name := pick(rng, randNamespaces)
		if del {
			tx.DeleteNamespace(name)
			delete(m.namespaces, name)
			return
		}
		n := &Namespace{Name: name, Labels: map[string]string{}}
		if rng.IntN(2) == 0 {
			n.Labels[LabelMode] = ModeEnabled
		}
		tx.SetNamespace(n)
		m.namespaces[name] = n
	case r < 12: // nodes
		name := pick(rng, randNodes)
		if del {
			tx.DeleteNode(name)
			delete(m.nodes, name)
			return
		}
		n := &Node{Name: name, IPs: []netip.Addr{pick(rng, randAddrs)}}
		tx.SetNode(n)
		m.nodes[name] = n
	case r < 55: // pods
		k := randKey(rng, "p", 6)
		if del {
			tx.DeletePod(k)
			delete(m.pods, k)
			return
		}
		p := randomPod(rng, k)
		if old := m.pods[k]; old != nil && rng.IntN(4) == 0 {
			p = old // the same value again: never rewritten once computed
		}
		tx.SetPod(p)
		m.pods[k] = p
	case r < 70: // services
		k := randKey(rng, "svc", 3)
		if del {
			tx.DeleteService(k)
			delete(m.services, k)
			return
		}
		svc := &Service{Namespace: k.Namespace, Name: k.Name}
		for range rng.IntN(3) {
			svc.ClusterIPs = append(svc.ClusterIPs, pick(rng, randVIPs))
		}
		for range rng.IntN(3) {
			svc.Ports = append(svc.Ports, ServicePort{Name: pick(rng, []string{"", "http", "grpc"}),
				Protocol: pick(rng, []string{"", "TCP", "TCP", "UDP"}), Port: pick(rng, []uint16{80, 443})})
		}
		tx.SetService(svc)
		m.services[k] = svc
	case r < 88: // EndpointSlices
		k := randKey(rng, "es", 5)
		if del {
			tx.DeleteEndpointSlice(k)
			delete(m.slices, k)
			return
		}
		es := &EndpointSlice{Namespace: k.Namespace, Name: k.Name, Service: pick(rng, []string{"", "svc0", "svc1", "svc2"}),
			AddressType: pick(rng, []string{"IPv4", "IPv4", "IPv6", "", "FQDN"})}
		for range rng.IntN(3) {
			es.Ports = append(es.Ports, EndpointPort{Name: pick(rng, []string{"", "http", "grpc"}),
				Protocol: pick(rng, []string{"", "TCP", "UDP"}), Port: pick(rng, []uint16{0, 8080, 8443})})
		}
		for range rng.IntN(4) {
			e := Endpoint{Addresses: []netip.Addr{pick(rng, randAddrs)}, Ready: rng.IntN(3) > 0, Serving: rng.IntN(2) == 0,
				Terminating: rng.IntN(3) == 0, Node: pick(rng, randNodes)}
			if rng.IntN(3) > 0 {
				pk := randKey(rng, "p", 7) // sometimes a pod that never exists
				e.Pod = &pk
			}
			es.Endpoints = append(es.Endpoints, e)
		}
		tx.SetEndpointSlice(es)
		m.slices[k] = es
	case r < 94: // NetworkPolicies
		k := randKey(rng, "np", 3)
		if del {
			tx.DeleteNetworkPolicy(k)
			delete(m.netpols, k)
			return
		}
		np := &NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: k.Namespace, Name: k.Name}}
		tx.SetNetworkPolicy(np)
		m.netpols[k] = np
	default: // custom objects
		gk, k := pick(rng, randKinds), randKey(rng, "o", 3)
		if del {
			tx.DeleteObject(gk, k)
			delete(m.objects[gk], k)
			return
		}
		o := &Object{GroupKind: gk, Namespace: k.Namespace, Name: k.Name}
		tx.SetObject(o)
		if m.objects[gk] == nil {
			m.objects[gk] = map[Key]*Object{}
		}
		m.objects[gk][k] = o
	}
}

func randomPod(rng *rand.Rand, k Key) *Pod {
	p := &Pod{Namespace: k.Namespace, Name: k.Name, ServiceAccount: pick(rng, []string{"", "sa", "Bad SA"}),
		Node: pick(rng, append([]string{""}, randNodes...)), Phase: pick(rng, []PodPhase{PodRunning, PodRunning, PodPending, PodSucceeded, PodFailed}),
		HostNetwork: rng.IntN(8) == 0, Terminating: rng.IntN(5) == 0, Labels: map[string]string{"app": pick(rng, []string{"x", "y"})}}
	for range rng.IntN(3) {
		p.IPs = append(p.IPs, pick(rng, randAddrs))
	}
	if rng.IntN(5) == 0 {
		p.Labels[LabelMode] = ModeDisabled
	}
	if rng.IntN(4) == 0 {
		p.SetAnnotations(map[string]string{AnnotationExcludeInboundPorts: pick(rng, []string{"8080", "15008", "x"}),
			AnnotationNetns: "/run/netns/" + k.Name})
	}
	return p
}
