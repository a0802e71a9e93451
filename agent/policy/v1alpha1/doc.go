// Package v1alpha1 holds the Go types of the nodemesh security API group
// (security.nodemesh.io/v1alpha1): AuthorizationPolicy, an identity-aware L4
// access policy close to Istio's security.istio.io AuthorizationPolicy, and
// PeerAuthentication, which sets the mTLS mode (STRICT or PERMISSIVE) per
// namespace, workload and port, close to Istio's PeerAuthentication.
//
// The types carry DeepCopy methods and register with a runtime.Scheme, so they
// can be used with client-go's typed REST clients, the dynamic client and
// runtime.DefaultUnstructuredConverter. The CRD manifests live in
// manifests/crds/. The meaning of the fields is implemented in package
// agent/policy (the L7 fields, methods, paths, hosts and request.headers
// conditions, with agent/l7/authz); fields nodemesh does not enforce (JWT,
// remoteIpBlocks) are in the schema so they are never silently pruned, and
// the loader refuses them.
//
// +k8s:deepcopy-gen=package
// +groupName=security.nodemesh.io
package v1alpha1
