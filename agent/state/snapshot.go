package state

import (
	"cmp"
	"fmt"
	"iter"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"unique"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
)

// Snapshot is one immutable, indexed version of the cluster state. All
// methods are safe for concurrent use; results must not be modified.
type Snapshot struct {
	version     uint64
	synced      bool
	trustDomain spiffeid.TrustDomain

	namespaces pmap.Map[string, *Namespace]
	nodes      pmap.Map[string, *Node]
	pods       pmap.Map[Key, *Pod]
	podsByIP   pmap.AddrMap[*Pod]
	podsByNode pmap.Map[string, []*Pod]
	services   pmap.Map[Key, *Service]
	vips       pmap.Map[netip.AddrPort, vip]
	slices     pmap.Map[Key, *EndpointSlice]
	backends   pmap.Map[servicePortKey, []Backend]
	netpols    pmap.Map[Key, *NetworkPolicy]
	objects    map[GroupKind]pmap.Map[Key, *Object]

	// lineage is the store that built the snapshot (its build index), nil
	// for an empty one; history records what the last builds touched
	// (ChangesSince), oldest first.
	lineage *buildIndex
	history []delta
}

func emptySnapshot(td spiffeid.TrustDomain) *Snapshot {
	return &Snapshot{
		trustDomain: td,
		namespaces:  pmap.New[string, *Namespace](pmap.String),
		nodes:       pmap.New[string, *Node](pmap.String),
		pods:        pmap.New[Key, *Pod](hashKey),
		podsByIP:    pmap.NewAddrMap[*Pod](),
		podsByNode:  pmap.New[string, []*Pod](pmap.String),
		services:    pmap.New[Key, *Service](hashKey),
		vips:        pmap.New[netip.AddrPort, vip](pmap.AddrPort),
		slices:      pmap.New[Key, *EndpointSlice](hashKey),
		backends:    pmap.New[servicePortKey, []Backend](hashServicePort),
		netpols:     pmap.New[Key, *NetworkPolicy](hashKey),
		objects:     map[GroupKind]pmap.Map[Key, *Object]{},
	}
}

type vip struct {
	svc  *Service
	port int // index into svc.Ports
}

type servicePortKey struct {
	svc  Key
	port string // ServicePort.Name
}

// Backend is a ready endpoint of a service port.
type Backend struct {
	Addr netip.AddrPort `json:"addr"`
	// ref is the endpoint's targetRef pod, if any; BackendPod resolves it.
	// Backends hold no pod pointers, so a pod change does not touch the
	// backends of the services it serves.
	ref *Key
	// Node is the endpoint's node name from the EndpointSlice.
	Node string `json:"node,omitempty"`
	// Terminating is set when the backend is only serving while
	// terminating (used when a port has no ready endpoint at all).
	Terminating bool `json:"terminating,omitempty"`
}

// PodRef returns the pod the backend's endpoint references (its
// targetRef), if any. BackendPod resolves the backend to that pod when the
// snapshot has it, else to the owner of the backend's address.
func (b Backend) PodRef() (Key, bool) {
	if b.ref == nil {
		return Key{}, false
	}
	return *b.ref, true
}

// Version increases with every change the store applied.
func (s *Snapshot) Version() uint64 { return s.version }

// Synced reports whether every source had delivered its initial state when
// this snapshot was built.
func (s *Snapshot) Synced() bool { return s.synced }

// TrustDomain is the trust domain identities were built in.
func (s *Snapshot) TrustDomain() spiffeid.TrustDomain { return s.trustDomain }

// PodByIP returns the live pod that owns ip, or nil. Host-network pods are
// never returned: they share the node's address.
func (s *Snapshot) PodByIP(ip netip.Addr) *Pod { return s.podsByIP.Lookup(ip.Unmap()) }

// Pod returns a pod by namespace and name, or nil.
func (s *Snapshot) Pod(namespace, name string) *Pod { return s.pods.Lookup(Key{namespace, name}) }

// PodsOnNode returns the pods scheduled on node, sorted by namespace/name.
func (s *Snapshot) PodsOnNode(node string) []*Pod { return s.podsByNode.Lookup(node) }

// Pods returns every pod, sorted by namespace/name.
func (s *Snapshot) Pods() []*Pod { return sortedValues(&s.pods) }

// AllPods yields every pod in no particular order, without the cost of
// sorting them.
func (s *Snapshot) AllPods() iter.Seq[*Pod] {
	return func(yield func(*Pod) bool) {
		for _, p := range s.pods.All() {
			if !yield(p) {
				return
			}
		}
	}
}

// Namespace returns a namespace by name, or nil.
func (s *Snapshot) Namespace(name string) *Namespace { return s.namespaces.Lookup(name) }

// Namespaces returns every namespace, sorted by name.
func (s *Snapshot) Namespaces() []*Namespace {
	out := make([]*Namespace, 0, s.namespaces.Len())
	for _, n := range s.namespaces.All() {
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b *Namespace) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// Node returns a node by name, or nil.
func (s *Snapshot) Node(name string) *Node { return s.nodes.Lookup(name) }

// Nodes returns every node, sorted by name.
func (s *Snapshot) Nodes() []*Node {
	out := make([]*Node, 0, s.nodes.Len())
	for _, n := range s.nodes.All() {
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b *Node) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// Service returns a service by namespace and name, or nil.
func (s *Snapshot) Service(namespace, name string) *Service {
	return s.services.Lookup(Key{namespace, name})
}

// Services returns every service, sorted by namespace/name.
func (s *Snapshot) Services() []*Service { return sortedValues(&s.services) }

// AllServices yields every service in no particular order: for callers
// that look at each one and need no order, without the sort of Services
// (which dominates at thousands of services).
func (s *Snapshot) AllServices() iter.Seq[*Service] {
	return func(yield func(*Service) bool) {
		for _, v := range s.services.All() {
			if !yield(v) {
				return
			}
		}
	}
}

// Compare orders keys by namespace, then name (the order of Services,
// Pods and the other sorted lists).
func (k Key) Compare(o Key) int { return compareKeys(k, o) }

// ServiceByVIP returns the service and TCP port that own a ClusterIP:port.
func (s *Snapshot) ServiceByVIP(ap netip.AddrPort) (*Service, ServicePort, bool) {
	v, ok := s.vips.Get(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	if !ok {
		return nil, ServicePort{}, false
	}
	return v.svc, v.svc.Ports[v.port], true
}

// Backends returns the endpoints of a service port, sorted by address: the
// ready ones, or, when none is ready, the ones still serving while
// terminating (kube-proxy's rule, so connections drain instead of failing).
// Endpoints listed by several slices appear once.
func (s *Snapshot) Backends(svc *Service, port ServicePort) []Backend {
	return s.backends.Lookup(servicePortKey{svc.Key(), port.Name})
}

// BackendPod returns the pod behind a backend of this snapshot: the pod
// its endpoint references, else the pod that owns its address; nil when
// the snapshot knows neither (an endpoint outside the cluster, or a pod not
// yet seen).
func (s *Snapshot) BackendPod(b Backend) *Pod {
	if b.ref != nil {
		if p := s.pods.Lookup(*b.ref); p != nil {
			return p
		}
	}
	return s.podsByIP.Lookup(b.Addr.Addr())
}

// EndpointSlices returns every slice, sorted by namespace/name.
func (s *Snapshot) EndpointSlices() []*EndpointSlice { return sortedValues(&s.slices) }

// NetworkPolicies returns the NetworkPolicies of a namespace ("" for all),
// sorted by namespace/name.
func (s *Snapshot) NetworkPolicies(namespace string) []*NetworkPolicy {
	var out []*NetworkPolicy
	for k, p := range s.netpols.All() {
		if namespace == "" || k.Namespace == namespace {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b *NetworkPolicy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return out
}

// NetworkPolicy returns a NetworkPolicy by namespace and name, or nil.
func (s *Snapshot) NetworkPolicy(namespace, name string) *NetworkPolicy {
	return s.netpols.Lookup(Key{namespace, name})
}

// Object returns a custom object of a kind by key, or nil.
func (s *Snapshot) Object(gk GroupKind, k Key) *Object {
	m, ok := s.objects[gk]
	if !ok {
		return nil
	}
	return m.Lookup(k)
}

// Objects returns the custom objects of a kind, sorted by namespace/name.
func (s *Snapshot) Objects(gk GroupKind) []*Object {
	m, ok := s.objects[gk]
	if !ok {
		return []*Object{}
	}
	return sortedValues(&m)
}

// ObjectKinds returns the kinds of custom objects present.
func (s *Snapshot) ObjectKinds() []GroupKind {
	out := make([]GroupKind, 0, len(s.objects))
	for gk := range s.objects {
		out = append(out, gk)
	}
	slices.SortFunc(out, func(a, b GroupKind) int { return cmp.Compare(a.String(), b.String()) })
	return out
}

type keyed interface{ Key() Key }

func sortedValues[T keyed](m *pmap.Map[Key, T]) []T {
	out := make([]T, 0, m.Len())
	for _, v := range m.All() {
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b T) int { return compareKeys(a.Key(), b.Key()) })
	return out
}

func compareKeys(a, b Key) int {
	return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
}

func isTCP(proto string) bool { return proto == "" || proto == "TCP" }

// preferPod decides which of two pods claiming one IP owns it: a live pod
// over a finished one, a running pod over a terminating or pending one, then
// by namespace/name so the choice is stable.
func preferPod(a, b *Pod) bool {
	rank := func(p *Pod) int {
		switch {
		case !p.Live():
			return 0
		case p.Terminating:
			return 1
		case p.Phase != PodRunning:
			return 2
		default:
			return 3
		}
	}
	if ra, rb := rank(a), rank(b); ra != rb {
		return ra > rb
	}
	return compareKeys(a.Key(), b.Key()) < 0
}

// computePod returns a copy of p with its computed fields filled in.
func computePod(p *Pod, ns *Namespace, td spiffeid.TrustDomain) *Pod {
	c := *p
	fillComputed(&c, ns, td)
	return &c
}

// fillComputed fills in p's computed fields, which depend only on p's own
// input fields, its namespace's enrollment and the trust domain.
func fillComputed(c *Pod, ns *Namespace, td spiffeid.TrustDomain) {
	p := *c // the inputs, read from a copy while c is rewritten
	d := p.Detail()
	c.computed = true
	d.Problems = nil
	sa := p.ServiceAccount
	if sa == "" {
		sa = "default" // what the API server fills in
	}
	id, err := spiffeid.FromSegments(td, "ns", p.Namespace, "sa", sa)
	if err != nil {
		d.Problems = append(d.Problems, fmt.Sprintf("building SPIFFE ID for service account %q: %v", sa, err))
	}
	// Interned: the pods of one service account share the ID's strings.
	c.Identity = unique.Make(id).Value()
	c.Enrolled = ns != nil && ns.Enrolled && p.Labels[LabelMode] != ModeDisabled && !p.HostNetwork
	d.ExcludeInboundPorts, err = parsePorts(d.Annotations[AnnotationExcludeInboundPorts])
	if err == nil {
		err = checkInboundExclusions(d.ExcludeInboundPorts)
	}
	if err != nil {
		d.ExcludeInboundPorts = nil
		d.Problems = append(d.Problems, fmt.Sprintf("annotation %s ignored (nothing excluded): %v", AnnotationExcludeInboundPorts, err))
	}
	d.ExcludeOutboundPorts, err = parsePorts(d.Annotations[AnnotationExcludeOutboundPorts])
	if err != nil {
		d.Problems = append(d.Problems, fmt.Sprintf("annotation %s ignored (nothing excluded): %v", AnnotationExcludeOutboundPorts, err))
	}
	c.Ref = p.Namespace + "/" + p.Name
	d.Netns = d.Annotations[AnnotationNetns]
	d.Cgroup = d.Annotations[AnnotationCgroup]
	c.SetDetail(d)
}

// parsePorts parses "80, 8080" into ports. Any bad element rejects the whole
// list, so a typo never excludes a port nobody meant to exclude.
// reservedInbound are the ports an inbound exclusion may not name: the
// agent's own (docs/architecture.md) and capture's self-check probe.
var reservedInbound = []uint16{15000, 15001, 15006, 15008, 15020, 15021, 15099}

// checkInboundExclusions refuses exclusions of the agent's ports: excluding
// 15008 or 15006 from capture would make no sense and excluding the probe
// port would make capture's self-check lie.
func checkInboundExclusions(ports []uint16) error {
	for _, p := range ports {
		if slices.Contains(reservedInbound, p) {
			return fmt.Errorf("port %d is reserved for the nodemesh agent (%v)", p, reservedInbound)
		}
	}
	return nil
}

func parsePorts(s string) ([]uint16, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var out []uint16
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		n, err := strconv.ParseUint(f, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port number (1-65535) in %q", f, s)
		}
		out = append(out, uint16(n))
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}
