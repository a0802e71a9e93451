// Package policy is nodemesh's L4 policy engine: it decides whether a
// connection between two endpoints is allowed under Kubernetes NetworkPolicy
// (networking.k8s.io/v1), nodemesh AuthorizationPolicy
// (security.nodemesh.io/v1alpha1, close to Istio's) and the mTLS mode set by
// PeerAuthentication.
//
// Decisions are pure functions of an immutable, versioned Snapshot (namespaces,
// pods, nodes and policies) and a Flow (source and real destination address,
// the inner destination port and protocol, and the source's SPIFFE ID when the
// connection arrived over authenticated HBONE). The package does no I/O: the
// agent builds snapshots from informers, nodemeshctl from files, and both ask
// the same Engine, which caches decisions in an LRU keyed by snapshot version
// and flow.
//
// Evaluation order (see docs/policy.md):
//
//  1. Egress, at the source: the NetworkPolicies selecting the source pod.
//  2. Ingress, at the destination: the mTLS mode (STRICT refuses plaintext
//     except kubelet probes), the NetworkPolicies selecting the destination
//     pod, then AuthorizationPolicies: any matching DENY denies; if any ALLOW
//     policy selects the pod one must match; matching AUDIT policies are
//     recorded in the decision.
//
// A connection is allowed only if both directions allow it. The HBONE tunnel
// port (15008) is never evaluated: a Flow always names the inner destination
// port, so allowing 15008 in a policy opens nothing.
package policy
