// Package fromstate turns the agent's cluster state (agent/state) into the
// policy engine's input, so the agent can build a policy.Snapshot for every
// state version. It is the only way from Kubernetes objects to the engine:
// the agent (informers or static files) and `nodemeshctl policy explain
// --from-files` both go agent/k8s -> agent/state -> here. It covers
// namespaces, nodes, pods (with enrollment, named ports and probe ports),
// NetworkPolicies, and the AuthorizationPolicy and PeerAuthentication
// custom objects, converted from their unstructured form.
package fromstate

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Kinds of the custom objects this package reads from the state.
var (
	AuthorizationPolicyKind = state.GroupKind{Group: v1alpha1.GroupName, Kind: "AuthorizationPolicy"}
	PeerAuthenticationKind  = state.GroupKind{Group: v1alpha1.GroupName, Kind: "PeerAuthentication"}
)

// Snapshot builds the policy snapshot for a state snapshot, with the same
// version and trust domain (rootNamespace "" means policy.DefaultRootNamespace).
// The errors are the custom objects that did not convert (see Input); the
// policies the engine refused are in the snapshot's Problems. It converts
// and indexes everything; the agent, which builds a snapshot per state
// version, uses a Builder instead.
func Snapshot(s *state.Snapshot, rootNamespace string) (*policy.Snapshot, []error) {
	return NewBuilder(rootNamespace).Snapshot(s)
}

// Builder builds the policy snapshots of successive state snapshots of
// one store. It keeps the state snapshot it converted last and asks the
// new one what changed since (state.Snapshot.ChangesSince, which compares
// only the shards of the state's maps that differ), then tells its
// policy.Builder only those changes: a change to one object costs that
// object's conversion and the policy snapshot's update, not a pass over
// the cluster. Not safe for concurrent use.
type Builder struct {
	// localNode and localAddrs: see WithLocalNode.
	localNode     string
	localAddrs    func() []netip.Addr
	rootNamespace string
	td            string
	pb            *policy.Builder
	prev          *state.Snapshot // the state snapshot converted last
	local         []netip.Addr    // localAddrs' answer then
	// unreadable are the custom objects that did not convert, with why.
	unreadable map[objectKey]error
}

type objectKey struct {
	kind state.GroupKind
	key  state.Key
}

// converted is one custom object's conversion: a typed policy or an
// unreadable stand-in with its error.
type converted struct {
	ap         *v1alpha1.AuthorizationPolicy
	pa         *v1alpha1.PeerAuthentication
	unreadable *policy.Unreadable
	err        error
}

// NewBuilder returns a Builder (rootNamespace "" means
// policy.DefaultRootNamespace).
func NewBuilder(rootNamespace string) *Builder {
	return &Builder{rootNamespace: rootNamespace}
}

// WithLocalNode makes addrs (called on every build) more addresses of node
// name, the node the caller runs on: the addresses of that node's own
// network interfaces. kubelet's probes to a pod leave from the interface
// that routes to it, which with a bridge CNI is the bridge's gateway
// address in the pod range (10.244.0.1 on cni0), not an address of the
// Node object; without it a NetworkPolicy or STRICT refuses the probes.
func (b *Builder) WithLocalNode(name string, addrs func() []netip.Addr) *Builder {
	b.localNode, b.localAddrs = name, addrs
	return b
}

// Snapshot builds the policy snapshot of s; see the package's Snapshot.
// s must be a snapshot of the same store as the previous call's, or the
// first (a snapshot of another store is converted from scratch only if it
// has another trust domain).
func (b *Builder) Snapshot(s *state.Snapshot) (*policy.Snapshot, []error) {
	td := s.TrustDomain().Name()
	if b.pb == nil || td != b.td {
		b.td = td
		b.pb = policy.NewBuilder(policy.Options{RootNamespace: b.rootNamespace, TrustDomain: td})
		b.prev, b.local, b.unreadable = nil, nil, map[objectKey]error{}
	}
	c := s.ChangesSince(b.prev)
	for _, name := range c.Namespaces {
		if ns := s.Namespace(name); ns != nil {
			b.pb.SetNamespace(policy.Namespace{Name: ns.Name, Labels: ns.Labels})
		} else {
			b.pb.DeleteNamespace(name)
		}
	}
	b.nodes(s, c.Nodes)
	// A pod is converted again when it changed, or when an address it had
	// or has changed owner (only the addresses the state attributes to a
	// pod are its in the policy snapshot).
	pods := make(map[state.Key]bool, len(c.Pods))
	for _, k := range c.Pods {
		pods[k] = true
	}
	for _, ip := range c.Addresses {
		for _, snap := range []*state.Snapshot{b.prev, s} {
			if snap == nil {
				continue
			}
			if p := snap.PodByIP(ip); p != nil {
				pods[p.Key()] = true
			}
		}
	}
	for k := range pods {
		if p := s.Pod(k.Namespace, k.Name); p != nil {
			b.pb.SetPod(convertPod(s, p))
		} else {
			b.pb.DeletePod(k.Namespace + "/" + k.Name)
		}
	}
	for _, k := range c.NetworkPolicies {
		if np := s.NetworkPolicy(k.Namespace, k.Name); np != nil {
			b.pb.SetNetworkPolicy(np)
		} else {
			b.pb.DeleteNetworkPolicy(k.Namespace, k.Name)
		}
	}
	for _, kind := range []state.GroupKind{AuthorizationPolicyKind, PeerAuthenticationKind} {
		for _, k := range c.Objects[kind] {
			b.object(s, kind, k)
		}
	}
	b.prev = s
	return b.pb.Snapshot(s.Version()), b.errors()
}

// nodes updates the changed nodes, and the local node when its interfaces'
// addresses changed.
func (b *Builder) nodes(s *state.Snapshot, changed []string) {
	var local []netip.Addr
	if b.localNode != "" && b.localAddrs != nil {
		local = b.localAddrs()
	}
	if !slices.Equal(local, b.local) && !slices.Contains(changed, b.localNode) {
		changed = append(changed, b.localNode)
	}
	b.local = local
	for _, name := range changed {
		n := s.Node(name)
		var ips []netip.Addr
		if n != nil {
			ips = n.IPs
		}
		if name == b.localNode && len(local) > 0 {
			ips = append(slices.Clip(ips), local...)
		}
		if n == nil && (name != b.localNode || len(local) == 0) {
			b.pb.DeleteNode(name)
			continue
		}
		b.pb.SetNode(policy.Node{Name: name, IPs: ips})
	}
}

// object converts a changed custom object, or removes it.
func (b *Builder) object(s *state.Snapshot, kind state.GroupKind, k state.Key) {
	ok := objectKey{kind, k}
	ref := policy.PolicyRef{Kind: policy.KindAuthorizationPolicy, Namespace: k.Namespace, Name: k.Name}
	if kind == PeerAuthenticationKind {
		ref.Kind = policy.KindPeerAuthentication
	}
	o := s.Object(kind, k)
	var c converted
	if o != nil {
		c = convertObject(o)
	}
	if c.unreadable == nil {
		delete(b.unreadable, ok)
		b.pb.DeleteUnreadable(ref)
	}
	if c.ap == nil && ref.Kind == policy.KindAuthorizationPolicy {
		b.pb.DeleteAuthorizationPolicy(k.Namespace, k.Name)
	}
	if c.pa == nil && ref.Kind == policy.KindPeerAuthentication {
		b.pb.DeletePeerAuthentication(k.Namespace, k.Name)
	}
	switch {
	case c.unreadable != nil:
		b.unreadable[ok] = c.err
		b.pb.SetUnreadable(*c.unreadable)
	case c.ap != nil:
		b.pb.SetAuthorizationPolicy(c.ap)
	case c.pa != nil:
		b.pb.SetPeerAuthentication(c.pa)
	}
}

// errors describes the unreadable objects, AuthorizationPolicies first,
// each kind by namespace and name.
func (b *Builder) errors() []error {
	keys := slices.SortedFunc(maps.Keys(b.unreadable), func(a, c objectKey) int {
		return cmp.Or(cmp.Compare(a.kind.Kind, c.kind.Kind), cmp.Compare(a.key.Namespace, c.key.Namespace), cmp.Compare(a.key.Name, c.key.Name))
	})
	var errs []error
	for _, k := range keys {
		errs = append(errs, b.unreadable[k])
	}
	return errs
}

// Input converts a state snapshot. A custom object that does not convert to
// its Go type goes to Input.Unreadable, which the engine enforces fail closed
// for the object's namespace (explanations name it); the returned errors
// describe each such object.
func Input(s *state.Snapshot) (policy.Input, []error) {
	var in policy.Input
	var errs []error
	for _, ns := range s.Namespaces() {
		in.Namespaces = append(in.Namespaces, policy.Namespace{Name: ns.Name, Labels: ns.Labels})
	}
	for _, n := range s.Nodes() {
		in.Nodes = append(in.Nodes, policy.Node{Name: n.Name, IPs: n.IPs})
	}
	for p := range s.AllPods() {
		in.Pods = append(in.Pods, convertPod(s, p))
	}
	in.NetworkPolicies = s.NetworkPolicies("")
	for _, kind := range []state.GroupKind{AuthorizationPolicyKind, PeerAuthenticationKind} {
		for _, o := range s.Objects(kind) {
			c := convertObject(o)
			switch {
			case c.unreadable != nil:
				errs = append(errs, c.err)
				in.Unreadable = append(in.Unreadable, *c.unreadable)
			case c.ap != nil:
				in.AuthorizationPolicies = append(in.AuthorizationPolicies, c.ap)
			case c.pa != nil:
				in.PeerAuthentications = append(in.PeerAuthentications, c.pa)
			}
		}
	}
	return in, errs
}

// attributed reports whether ip of p is p's in s: a finished pod's IP may
// already belong to a new pod.
func attributed(s *state.Snapshot, p *state.Pod, ip netip.Addr) bool {
	return p.HostNetwork || s.PodByIP(ip) == p
}

func convertPod(s *state.Snapshot, p *state.Pod) policy.Pod {
	pp := policy.Pod{
		Namespace:      p.Namespace,
		Name:           p.Name,
		Labels:         p.Labels,
		ServiceAccount: p.ServiceAccount,
		Node:           p.Node,
		HostNetwork:    p.HostNetwork,
		Unmeshed:       !p.Enrolled,
	}
	// Only the addresses the state attributes to this pod: the state's own
	// slice (immutable, so the policy snapshot may share it) when that is
	// all of them, as it nearly always is.
	if len(p.IPs) > 0 && !slices.ContainsFunc(p.IPs, func(ip netip.Addr) bool { return !attributed(s, p, ip) }) {
		pp.IPs = slices.Clip(p.IPs)
	} else {
		for _, ip := range p.IPs {
			if attributed(s, p, ip) {
				pp.IPs = append(pp.IPs, ip)
			}
		}
	}
	for _, cp := range p.Ports {
		proto := corev1.Protocol(cp.Protocol)
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		pp.Ports = append(pp.Ports, policy.ContainerPort{Name: cp.Name, Port: int32(cp.Port), Protocol: proto})
	}
	for _, port := range p.ProbePorts {
		pp.ProbePorts = append(pp.ProbePorts, int32(port))
	}
	return pp
}

// convertObject converts an AuthorizationPolicy or PeerAuthentication
// object, or describes its unreadable stand-in.
func convertObject(o *state.Object) converted {
	switch o.GroupKind {
	case AuthorizationPolicyKind:
		var ap v1alpha1.AuthorizationPolicy
		if err := convert(o, &ap); err != nil {
			// The action decides the stand-in: absent or empty is ALLOW (the
			// default); unreadable is treated as DENY.
			action, ok := nestedString(o.Content, "spec", "action")
			if !ok && !hasPath(o.Content, "spec", "action") {
				action = ""
			} else if !ok {
				action = "UNREADABLE"
			}
			if action == "" {
				action = string(v1alpha1.ActionAllow)
			}
			return converted{err: err, unreadable: &policy.Unreadable{
				Ref:    policy.PolicyRef{Kind: policy.KindAuthorizationPolicy, Namespace: o.Namespace, Name: o.Name},
				Action: v1alpha1.Action(action), Err: err,
			}}
		}
		return converted{ap: &ap}
	default:
		var pa v1alpha1.PeerAuthentication
		if err := convert(o, &pa); err != nil {
			return converted{err: err, unreadable: &policy.Unreadable{
				Ref: policy.PolicyRef{Kind: policy.KindPeerAuthentication, Namespace: o.Namespace, Name: o.Name}, Err: err,
			}}
		}
		return converted{pa: &pa}
	}
}

func convert(o *state.Object, into runtime.Object) error {
	if o.APIVersion != v1alpha1.SchemeGroupVersion.String() {
		return fmt.Errorf("converting %s %s: apiVersion %q, want %s", o.GroupKind, o.Key(), o.APIVersion, v1alpha1.SchemeGroupVersion)
	}
	// Unknown fields are an error (the object is then enforced fail
	// closed): ignoring a misspelt field could widen access. The API
	// server prunes them already; static files and explain do not.
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Content, into, true); err != nil {
		return fmt.Errorf("converting %s %s: %w", o.GroupKind, o.Key(), err)
	}
	m := into.(metav1.Object)
	// The state's key is authoritative (the content may lack metadata).
	m.SetNamespace(o.Namespace)
	m.SetName(o.Name)
	return nil
}

// nestedString reads a string field; ok is false when a step is missing or
// not of the expected type.
func nestedString(m map[string]any, path ...string) (string, bool) {
	var cur any = m
	for _, p := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			return "", false
		}
		if cur, ok = mm[p]; !ok {
			return "", false
		}
	}
	v, ok := cur.(string)
	return v, ok
}

// hasPath reports whether the field exists (whatever its type).
func hasPath(m map[string]any, path ...string) bool {
	var cur any = m
	for _, p := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			return false
		}
		if cur, ok = mm[p]; !ok {
			return false
		}
	}
	return true
}
