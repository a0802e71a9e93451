package policy

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// NamespaceNameLabel is the label the API server sets on every namespace to
// its name; the snapshot adds it when an input namespace lacks it.
const NamespaceNameLabel = "kubernetes.io/metadata.name"

// DefaultRootNamespace is the namespace whose selector-less
// AuthorizationPolicies and PeerAuthentications apply to the whole mesh.
const DefaultRootNamespace = "nodemesh-system"

// DefaultTrustDomain is the SPIFFE trust domain used when Options leaves it empty.
const DefaultTrustDomain = "cluster.local"

// Namespace is a namespace and its labels.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// ContainerPort is a port a pod's container declares; named ports in
// NetworkPolicies resolve against these.
type ContainerPort struct {
	Name     string
	Port     int32
	Protocol corev1.Protocol
}

// Pod is what the engine needs to know about a pod.
type Pod struct {
	Namespace      string
	Name           string
	Labels         map[string]string
	IPs            []netip.Addr
	ServiceAccount string
	Node           string
	HostNetwork    bool
	Ports          []ContainerPort
	// Unmeshed marks a pod that is not enrolled in the mesh (or opted out):
	// no agent terminates its inbound traffic, so only NetworkPolicy applies
	// to connections to it; mTLS mode and AuthorizationPolicy do not. The
	// zero value (meshed) is the stricter one.
	Unmeshed bool
	// ProbePorts are the TCP ports the pod's HTTP, TCP and gRPC probes target
	// (named probe ports already resolved). Kubelet probes from the pod's node
	// to these ports pass STRICT mTLS.
	ProbePorts []int32
}

// Key returns "namespace/name".
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// Node is a node name and its addresses (the source addresses of kubelet probes).
type Node struct {
	Name string
	IPs  []netip.Addr
}

// Input is everything a snapshot is built from. The snapshot does not keep
// references to the policy objects' mutable parts; callers may reuse them.
// Pods are kept as given, their label maps and slices included, so that
// pods sharing an interned label set (agent/k8s) share it here too: callers
// must not modify a pod's maps or slices after NewSnapshot.
type Input struct {
	Namespaces            []Namespace
	Pods                  []Pod
	Nodes                 []Node
	NetworkPolicies       []*networkingv1.NetworkPolicy
	AuthorizationPolicies []*v1alpha1.AuthorizationPolicy
	PeerAuthentications   []*v1alpha1.PeerAuthentication
	// Unreadable are policy objects that could not even be decoded (for
	// example a custom object whose content does not fit the Go type). They
	// are enforced fail closed for their whole namespace; see Unreadable.
	Unreadable []Unreadable
}

// Unreadable names a policy object the caller could not decode.
//
// Stand-ins: a NetworkPolicy isolates every pod of its namespace in both
// directions; an AuthorizationPolicy whose Action is known to be ALLOW
// selects the namespace and matches nothing, AUDIT is inert, and any other
// (DENY, CUSTOM or unknown) denies every connection to the namespace's
// workloads; a PeerAuthentication makes the namespace STRICT.
type Unreadable struct {
	Ref PolicyRef
	// Action is the AuthorizationPolicy's action if it could be read, else "".
	Action v1alpha1.Action
	Err    error
}

// Options tune how a snapshot interprets its input.
type Options struct {
	// RootNamespace holds mesh-wide AuthorizationPolicies and
	// PeerAuthentications (those without a selector). Default DefaultRootNamespace.
	RootNamespace string
	// TrustDomain of the mesh's SPIFFE IDs. Default DefaultTrustDomain.
	TrustDomain string
}

// Problem is an input object the snapshot refused. A refused policy is not
// dropped: it is replaced by a fail-closed stand-in (see docs/policy.md), so
// refusing a policy never widens access.
type Problem struct {
	Ref PolicyRef
	Err error
}

func (p Problem) Error() string { return fmt.Sprintf("%s: %v", p.Ref, p.Err) }

// Snapshot is an immutable, indexed view of the cluster's policy state.
// It is safe for concurrent use.
type Snapshot struct {
	version     uint64
	opts        Options
	namespaces  map[string]map[string]string
	pods        map[string]*podEntry
	podsByIP    map[netip.Addr]*podEntry
	nodeByIP    map[netip.Addr]string
	nodeIPs     map[string][]netip.Addr
	problems    []Problem
	netpolCount int
	authzCount  int
	paCount     int
	// requestHeaders are the headers AuthorizationPolicy conditions name.
	requestHeaders []string
}

// RequestHeaders returns the request headers (canonical names) that
// AuthorizationPolicy conditions name: a request that repeats one is
// refused before authorization (authz.Prepare), because applications
// disagree on which value counts.
func (s *Snapshot) RequestHeaders() []string { return s.requestHeaders }

type podEntry struct {
	Pod
	spiffeID   string
	ingressNPs []*netPol // NetworkPolicies selecting the pod with policyTypes Ingress
	egressNPs  []*netPol
	denyAZ     []*authzPolicy
	allowAZ    []*authzPolicy
	auditAZ    []*authzPolicy
	mtls       []*peerAuthn // candidates, narrowest first
}

// Version returns the version the snapshot was built with.
func (s *Snapshot) Version() uint64 { return s.version }

// Problems returns the input objects that were refused, in a stable order.
func (s *Snapshot) Problems() []Problem { return slices.Clone(s.problems) }

// Counts returns the numbers of pods, NetworkPolicies, AuthorizationPolicies
// and PeerAuthentications in the snapshot.
func (s *Snapshot) Counts() (pods, netpols, authz, peerAuthn int) {
	return len(s.pods), s.netpolCount, s.authzCount, s.paCount
}

// Pod returns the pod "ns/name".
func (s *Snapshot) Pod(key string) (Pod, bool) {
	p, ok := s.pods[key]
	if !ok {
		return Pod{}, false
	}
	return p.Pod, true
}

// PodByIP returns the pod (not host-network) that owns ip.
func (s *Snapshot) PodByIP(ip netip.Addr) (Pod, bool) {
	p, ok := s.podsByIP[ip.Unmap()]
	if !ok {
		return Pod{}, false
	}
	return p.Pod, true
}

// SPIFFEID returns the SPIFFE ID of a pod's service account in this
// snapshot's trust domain.
func (s *Snapshot) SPIFFEID(p Pod) string {
	sa := p.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return "spiffe://" + s.opts.TrustDomain + "/ns/" + p.Namespace + "/sa/" + sa
}

// NewSnapshot indexes in. It never fails: invalid policies are recorded in
// Problems and replaced by fail-closed stand-ins; pods whose namespace is
// missing get a namespace with only the kubernetes.io/metadata.name label.
func NewSnapshot(version uint64, in Input, opts Options) *Snapshot {
	if opts.RootNamespace == "" {
		opts.RootNamespace = DefaultRootNamespace
	}
	if opts.TrustDomain == "" {
		opts.TrustDomain = DefaultTrustDomain
	}
	s := &Snapshot{
		version:    version,
		opts:       opts,
		namespaces: make(map[string]map[string]string, len(in.Namespaces)),
		pods:       make(map[string]*podEntry, len(in.Pods)),
		podsByIP:   make(map[netip.Addr]*podEntry, len(in.Pods)),
		nodeByIP:   make(map[netip.Addr]string, len(in.Nodes)),
		nodeIPs:    make(map[string][]netip.Addr, len(in.Nodes)),
	}
	for _, ns := range in.Namespaces {
		l := make(map[string]string, len(ns.Labels)+1)
		for k, v := range ns.Labels {
			l[k] = v
		}
		l[NamespaceNameLabel] = ns.Name
		s.namespaces[ns.Name] = l
	}
	for _, n := range in.Nodes {
		for _, ip := range n.IPs {
			s.nodeByIP[ip.Unmap()] = n.Name
		}
		s.nodeIPs[n.Name] = append(s.nodeIPs[n.Name], n.IPs...)
	}
	podsByNS := map[string][]*podEntry{}
	for _, p := range in.Pods {
		e := &podEntry{Pod: p}
		e.spiffeID = s.SPIFFEID(p)
		if _, ok := s.namespaces[p.Namespace]; !ok {
			s.namespaces[p.Namespace] = map[string]string{NamespaceNameLabel: p.Namespace}
		}
		s.pods[e.Key()] = e
		if !p.HostNetwork {
			for _, ip := range p.IPs {
				s.podsByIP[ip.Unmap()] = e
			}
		}
		podsByNS[p.Namespace] = append(podsByNS[p.Namespace], e)
	}

	// NetworkPolicies: compile, then attach to the pods they select in their namespace.
	nps := make([]*netPol, 0, len(in.NetworkPolicies))
	for _, np := range in.NetworkPolicies {
		if np == nil {
			continue
		}
		c, err := compileNetworkPolicy(np)
		if err != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: err})
		}
		nps = append(nps, c)
	}
	var unreadableAZ []*authzPolicy
	var unreadablePA []*peerAuthn
	for _, u := range in.Unreadable {
		err := fmt.Errorf("unreadable: %w", u.Err)
		if u.Err == nil {
			err = errors.New("unreadable")
		}
		s.problems = append(s.problems, Problem{Ref: u.Ref, Err: err})
		switch u.Ref.Kind {
		case KindNetworkPolicy:
			nps = append(nps, &netPol{ref: u.Ref, podSel: labels.Everything(), ingress: true, egress: true, refused: err})
		case KindAuthorizationPolicy:
			c := &authzPolicy{ref: u.Ref, refused: err}
			switch u.Action {
			case v1alpha1.ActionAllow:
				c.action = v1alpha1.ActionAllow
			case v1alpha1.ActionAudit:
				c.action = v1alpha1.ActionAudit
			default:
				c.action = v1alpha1.ActionDeny
				c.rules = []azRule{{}}
			}
			unreadableAZ = append(unreadableAZ, c)
		case KindPeerAuthentication:
			unreadablePA = append(unreadablePA, &peerAuthn{ref: u.Ref, mode: v1alpha1.MTLSStrict, refused: err})
		}
	}
	slices.SortFunc(nps, func(a, b *netPol) int { return a.ref.compare(b.ref) })
	s.netpolCount = len(nps)
	for _, np := range nps {
		for _, pod := range podsByNS[np.ref.Namespace] {
			if !np.podSel.Matches(labelSet(pod.Labels)) {
				continue
			}
			if np.ingress {
				pod.ingressNPs = append(pod.ingressNPs, np)
			}
			if np.egress {
				pod.egressNPs = append(pod.egressNPs, np)
			}
		}
	}

	// AuthorizationPolicies.
	azs := make([]*authzPolicy, 0, len(in.AuthorizationPolicies))
	for _, ap := range in.AuthorizationPolicies {
		if ap == nil {
			continue
		}
		c, err := compileAuthorizationPolicy(ap)
		if err != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: err})
		}
		for _, r := range c.rules {
			for _, w := range r.when {
				if !slices.Contains(s.requestHeaders, w.Header) {
					s.requestHeaders = append(s.requestHeaders, w.Header)
				}
			}
		}
		azs = append(azs, c)
	}
	slices.Sort(s.requestHeaders)
	azs = append(azs, unreadableAZ...)
	slices.SortFunc(azs, func(a, b *authzPolicy) int { return a.ref.compare(b.ref) })
	s.authzCount = len(azs)
	for _, az := range azs {
		var targets []*podEntry
		switch {
		case az.ref.Namespace == opts.RootNamespace && az.selector == nil:
			for _, p := range s.pods {
				targets = append(targets, p)
			}
			slices.SortFunc(targets, func(a, b *podEntry) int { return strings.Compare(a.Key(), b.Key()) })
		default:
			targets = podsByNS[az.ref.Namespace]
		}
		for _, pod := range targets {
			if az.selector != nil && !az.selector.Matches(labelSet(pod.Labels)) {
				continue
			}
			switch az.action {
			case v1alpha1.ActionDeny:
				pod.denyAZ = append(pod.denyAZ, az)
			case v1alpha1.ActionAudit:
				pod.auditAZ = append(pod.auditAZ, az)
			default:
				pod.allowAZ = append(pod.allowAZ, az)
			}
		}
	}

	// PeerAuthentications: per pod, candidates narrowest first.
	pas := make([]*peerAuthn, 0, len(in.PeerAuthentications))
	for _, pa := range in.PeerAuthentications {
		if pa == nil {
			continue
		}
		c, err := compilePeerAuthentication(pa)
		if err != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: err})
		}
		pas = append(pas, c)
	}
	pas = append(pas, unreadablePA...)
	// Oldest first, as Istio resolves conflicts, then by name for stability.
	slices.SortFunc(pas, func(a, b *peerAuthn) int {
		if c := a.created.Compare(b.created); c != 0 {
			return c
		}
		return a.ref.compare(b.ref)
	})
	s.paCount = len(pas)
	for _, pod := range s.pods {
		var workload, nsWide, root *peerAuthn
		for _, pa := range pas {
			switch {
			case pa.ref.Namespace == pod.Namespace && pa.selector != nil:
				if workload == nil && pa.selector.Matches(labelSet(pod.Labels)) {
					workload = pa
				}
			case pa.ref.Namespace == pod.Namespace && pa.selector == nil:
				if nsWide == nil {
					nsWide = pa
				}
			case pa.ref.Namespace == opts.RootNamespace && pa.selector == nil:
				if root == nil {
					root = pa
				}
			}
		}
		for _, pa := range []*peerAuthn{workload, nsWide, root} {
			if pa != nil {
				pod.mtls = append(pod.mtls, pa)
			}
		}
	}
	slices.SortFunc(s.problems, func(a, b Problem) int { return a.Ref.compare(b.Ref) })
	return s
}

// PolicyRef names a policy object.
type PolicyRef struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

// Policy kinds as they appear in PolicyRef.Kind.
const (
	KindNetworkPolicy       = "NetworkPolicy"
	KindAuthorizationPolicy = "AuthorizationPolicy"
	KindPeerAuthentication  = "PeerAuthentication"
)

func (r PolicyRef) String() string {
	return r.Kind + " " + r.Namespace + "/" + r.Name
}

// IsZero reports whether r names no policy.
func (r PolicyRef) IsZero() bool { return r == PolicyRef{} }

func (r PolicyRef) compare(o PolicyRef) int {
	return cmp.Or(strings.Compare(r.Kind, o.Kind), strings.Compare(r.Namespace, o.Namespace), strings.Compare(r.Name, o.Name))
}

// MTLSMode returns the mTLS mode of a pod's port ("namespace/name") as the
// engine resolves it (narrowest setting wins, PERMISSIVE by default) and the
// PeerAuthentication that set it (zero for the default). ok is false for an
// unknown pod.
func (s *Snapshot) MTLSMode(pod string, port uint16) (mode v1alpha1.MTLSMode, by PolicyRef, ok bool) {
	p, ok := s.pods[pod]
	if !ok {
		return "", PolicyRef{}, false
	}
	m, pa, _ := mtlsMode(p, port)
	if pa != nil {
		by = pa.ref
	}
	return m, by, true
}
