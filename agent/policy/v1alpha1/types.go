package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Action is what an AuthorizationPolicy does with the connections its rules match.
type Action string

// Actions. An omitted action means ALLOW, as in Istio.
const (
	ActionAllow Action = "ALLOW"
	ActionDeny  Action = "DENY"
	ActionAudit Action = "AUDIT"
	// ActionCustom exists in Istio (external authorizer); nodemesh refuses it.
	ActionCustom Action = "CUSTOM"
)

// AuthorizationPolicy allows, denies or audits connections to the workloads it
// selects, by the identity (SPIFFE ID), namespace and IP address of the source
// and the destination port. It is evaluated by the destination's agent.
//
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
type AuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec AuthorizationPolicySpec `json:"spec"`
}

// AuthorizationPolicySpec is the desired behaviour of an AuthorizationPolicy.
type AuthorizationPolicySpec struct {
	// Selector selects the workloads (pods) in the policy's namespace the
	// policy applies to. Nil selects every workload in the namespace (or, in
	// the root namespace, in the mesh).
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// TargetRef and TargetRefs are Istio's Gateway API attachment; refused.
	TargetRef  *PolicyTargetReference  `json:"targetRef,omitempty"`
	TargetRefs []PolicyTargetReference `json:"targetRefs,omitempty"`
	// Rules match connections. An ALLOW policy without rules allows nothing;
	// a rule without from and to matches every connection.
	Rules []Rule `json:"rules,omitempty"`
	// Action is ALLOW (default), DENY or AUDIT.
	Action Action `json:"action,omitempty"`
	// Provider belongs to Istio's CUSTOM action; refused.
	Provider *ExtensionProvider `json:"provider,omitempty"`
}

// WorkloadSelector selects pods by labels (Istio's WorkloadSelector).
type WorkloadSelector struct {
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// PolicyTargetReference is present only so that it is refused rather than pruned.
type PolicyTargetReference struct {
	Group     string `json:"group,omitempty"`
	Kind      string `json:"kind,omitempty"`
	Name      string `json:"name,omitempty"`
	Namespace string `json:"namespace,omitempty"`
}

// ExtensionProvider is present only so that it is refused rather than pruned.
type ExtensionProvider struct {
	Name string `json:"name,omitempty"`
}

// Rule matches a connection when any From matches, any To matches and every
// When condition holds. Missing from, to or when match everything.
type Rule struct {
	From []RuleFrom  `json:"from,omitempty"`
	To   []RuleTo    `json:"to,omitempty"`
	When []Condition `json:"when,omitempty"`
}

// RuleFrom wraps the source of a rule, as in Istio.
type RuleFrom struct {
	Source Source `json:"source"`
}

// RuleTo wraps the operation of a rule, as in Istio.
type RuleTo struct {
	Operation Operation `json:"operation"`
}

// Source describes the peer of a connection. All set fields must match.
// Principals are SPIFFE IDs ("spiffe://cluster.local/ns/x/sa/y" or Istio's
// form without the scheme); "*" alone, a prefix ending in "*" and a suffix
// starting with "*" are wildcards.
type Source struct {
	Principals    []string `json:"principals,omitempty"`
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	Namespaces    []string `json:"namespaces,omitempty"`
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	IPBlocks      []string `json:"ipBlocks,omitempty"`
	NotIPBlocks   []string `json:"notIpBlocks,omitempty"`

	// The fields below are not enforced by nodemesh; they are part of the
	// schema so that they are refused with an error, never ignored.
	RequestPrincipals    []string `json:"requestPrincipals,omitempty"`
	NotRequestPrincipals []string `json:"notRequestPrincipals,omitempty"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks,omitempty"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks,omitempty"`
	ServiceAccounts      []string `json:"serviceAccounts,omitempty"`
	NotServiceAccounts   []string `json:"notServiceAccounts,omitempty"`
}

// Operation describes the destination side of a connection.
type Operation struct {
	// Ports are destination (container) port numbers, as strings like Istio's.
	Ports    []string `json:"ports,omitempty"`
	NotPorts []string `json:"notPorts,omitempty"`

	// L7 fields: decided per request for Services opted in to L7 (the
	// destination agent), fail closed elsewhere (docs/l7.md).
	Hosts      []string `json:"hosts,omitempty"`
	NotHosts   []string `json:"notHosts,omitempty"`
	Methods    []string `json:"methods,omitempty"`
	NotMethods []string `json:"notMethods,omitempty"`
	Paths      []string `json:"paths,omitempty"`
	NotPaths   []string `json:"notPaths,omitempty"`
}

// Condition is Istio's "when" condition. Only request.headers[<name>] keys
// are supported (L7, like the operation's methods, paths and hosts).
type Condition struct {
	Key       string   `json:"key"`
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"notValues,omitempty"`
}

// AuthorizationPolicyList is a list of AuthorizationPolicy.
//
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
type AuthorizationPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AuthorizationPolicy `json:"items"`
}

// MTLSMode is the mutual-TLS mode of a workload port.
type MTLSMode string

// mTLS modes. UNSET inherits from the next wider setting; DISABLE exists in
// Istio and is refused by nodemesh (the mesh always tunnels meshed traffic).
const (
	MTLSUnset      MTLSMode = "UNSET"
	MTLSStrict     MTLSMode = "STRICT"
	MTLSPermissive MTLSMode = "PERMISSIVE"
	MTLSDisable    MTLSMode = "DISABLE"
)

// PeerAuthentication sets the mTLS mode for the workloads it selects: STRICT
// accepts only authenticated HBONE connections (and kubelet probes from the
// pod's node to its probe ports), PERMISSIVE also accepts plaintext.
//
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
type PeerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec PeerAuthenticationSpec `json:"spec"`
}

// PeerAuthenticationSpec is the desired mTLS mode.
type PeerAuthenticationSpec struct {
	// Selector selects pods in the namespace; nil means the whole namespace
	// (or, in the root namespace, the whole mesh).
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// Mtls is the mode for all ports of the selected workloads.
	Mtls *PeerAuthenticationMTLS `json:"mtls,omitempty"`
	// PortLevelMtls overrides the mode per container port (key: port number).
	// Only allowed together with a selector, as in Istio.
	PortLevelMtls map[string]PeerAuthenticationMTLS `json:"portLevelMtls,omitempty"`
}

// PeerAuthenticationMTLS holds an mTLS mode.
type PeerAuthenticationMTLS struct {
	Mode MTLSMode `json:"mode,omitempty"`
}

// PeerAuthenticationList is a list of PeerAuthentication.
//
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
type PeerAuthenticationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []PeerAuthentication `json:"items"`
}
