package policy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
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
	// Unmeshed marks a pod that is not enrolled in the mesh (or opted out):
	// no agent terminates its inbound traffic, so only NetworkPolicy applies
	// to connections to it; mTLS mode and AuthorizationPolicy do not. The
	// zero value (meshed) is the stricter one. (Beside HostNetwork: two
	// bools in one word keep a snapshot's pod entry in a smaller size class.)
	Unmeshed bool
	Ports    []ContainerPort
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
// references to the policy objects' mutable parts. Pods are kept as given,
// their label maps and slices included, so that pods sharing an interned
// label set (agent/k8s) share it here too: callers must not modify a pod's
// maps or slices after NewSnapshot, nor, with a Builder, any input (it
// recognises an unchanged one by its pointer or value). An address that
// several pods (not on the host network) claim is the last one's by
// namespace/name.
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
	id      uint64 // unique per snapshot (see Engine)
	version uint64
	opts    Options
	// The indexes are shared with the snapshots before and after, except
	// for the shards a change touched (see Builder).
	namespaces  pmap.Map[string, map[string]string]
	pods        pmap.Map[string, *podEntry]
	podsByIP    pmap.AddrMap[*podEntry]
	nodeIPs     pmap.Map[string, []netip.Addr]
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
	spiffeID string // interned: the pods of one service account share it
	// *attached are the policies that select the pod, shared by the pods
	// of its namespace that have the same label map (see nsState.attach):
	// a pod entry is then a fixed 176 bytes however many policies select
	// it. Never nil.
	*attached
}

// attached lists the policies that select the pods of one namespace with
// one label map, in the order decisions read them. It is immutable once
// built, except for refs, which only the Builder reads.
type attached struct {
	ingressNPs []*netPol // NetworkPolicies selecting the pod with policyTypes Ingress
	egressNPs  []*netPol
	denyAZ     []*authzPolicy
	allowAZ    []*authzPolicy
	auditAZ    []*authzPolicy
	mtls       []*peerAuthn // candidates, narrowest first

	// labels is the label map the policies were matched against (held, so
	// that its address, the Builder's key, is not reused while the entry
	// lives); refs counts the Builder's current pod entries holding it.
	labels map[string]string
	refs   int
}

// Version returns the version the snapshot was built with.
func (s *Snapshot) Version() uint64 { return s.version }

// Problems returns the input objects that were refused, in a stable order.
func (s *Snapshot) Problems() []Problem { return slices.Clone(s.problems) }

// Counts returns the numbers of pods, NetworkPolicies, AuthorizationPolicies
// and PeerAuthentications in the snapshot.
func (s *Snapshot) Counts() (pods, netpols, authz, peerAuthn int) {
	return s.pods.Len(), s.netpolCount, s.authzCount, s.paCount
}

// Pod returns the pod "ns/name".
func (s *Snapshot) Pod(key string) (Pod, bool) {
	p, ok := s.pods.Get(key)
	if !ok {
		return Pod{}, false
	}
	return p.Pod, true
}

// PodByIP returns the pod (not host-network) that owns ip.
func (s *Snapshot) PodByIP(ip netip.Addr) (Pod, bool) {
	p, ok := s.podsByIP.Get(ip.Unmap())
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
// It is a Builder's first build; a Builder reuses work across versions.
func NewSnapshot(version uint64, in Input, opts Options) *Snapshot {
	return NewBuilder(opts).Build(version, in)
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
	p, ok := s.pods.Get(pod)
	if !ok {
		return "", PolicyRef{}, false
	}
	m, pa, _ := mtlsMode(p, port)
	if pa != nil {
		by = pa.ref
	}
	return m, by, true
}

// NodeProbePorts returns the probe ports of pod ("namespace/name") that a
// plaintext TCP connection from the pod's own node reaches under every
// policy, whatever else the connection carries: the ports capture may open
// to the node while the pod's agent is away (redirect.Pod.NodeProbePorts),
// so that kubelet's probes survive an agent restart. The mTLS mode admits
// such a probe even when STRICT, NetworkPolicy always admits the pod's own
// node, and ALLOW AuthorizationPolicies exempt probes (evalIngress); a DENY
// AuthorizationPolicy may match the node's address or an HTTP request,
// which only the agent can judge, so a pod that one selects gets none
// (its probes then fail while the agent is away, as before). None either
// for a pod that is not in the snapshot or not in the mesh.
func (s *Snapshot) NodeProbePorts(pod string) []uint16 {
	p, ok := s.pods.Get(pod)
	if !ok || p.Unmeshed || p.HostNetwork || len(p.denyAZ) > 0 {
		return nil
	}
	var out []uint16
	for _, port := range p.ProbePorts {
		if port > 0 && port <= 65535 {
			out = append(out, uint16(port))
		}
	}
	return out
}
