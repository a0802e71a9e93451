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
	"fmt"

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
// policies the engine refused are in the snapshot's Problems.
func Snapshot(s *state.Snapshot, rootNamespace string) (*policy.Snapshot, []error) {
	in, errs := Input(s)
	return policy.NewSnapshot(s.Version(), in, policy.Options{
		RootNamespace: rootNamespace,
		TrustDomain:   s.TrustDomain().Name(),
	}), errs
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
	for _, p := range s.Pods() {
		pp := policy.Pod{
			Namespace:      p.Namespace,
			Name:           p.Name,
			Labels:         p.Labels,
			ServiceAccount: p.ServiceAccount,
			Node:           p.Node,
			HostNetwork:    p.HostNetwork,
			Unmeshed:       !p.Enrolled,
		}
		// Only the addresses the state attributes to this pod (a finished
		// pod's IP may already belong to a new pod).
		for _, ip := range p.IPs {
			if owner := s.PodByIP(ip); p.HostNetwork || owner == p {
				pp.IPs = append(pp.IPs, ip)
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
		in.Pods = append(in.Pods, pp)
	}
	in.NetworkPolicies = s.NetworkPolicies("")
	for _, o := range s.Objects(AuthorizationPolicyKind) {
		var ap v1alpha1.AuthorizationPolicy
		if err := convert(o, &ap); err != nil {
			errs = append(errs, err)
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
			in.Unreadable = append(in.Unreadable, policy.Unreadable{
				Ref:    policy.PolicyRef{Kind: policy.KindAuthorizationPolicy, Namespace: o.Namespace, Name: o.Name},
				Action: v1alpha1.Action(action), Err: err,
			})
			continue
		}
		in.AuthorizationPolicies = append(in.AuthorizationPolicies, &ap)
	}
	for _, o := range s.Objects(PeerAuthenticationKind) {
		var pa v1alpha1.PeerAuthentication
		if err := convert(o, &pa); err != nil {
			errs = append(errs, err)
			in.Unreadable = append(in.Unreadable, policy.Unreadable{
				Ref: policy.PolicyRef{Kind: policy.KindPeerAuthentication, Namespace: o.Namespace, Name: o.Name}, Err: err,
			})
			continue
		}
		in.PeerAuthentications = append(in.PeerAuthentications, &pa)
	}
	return in, errs
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
