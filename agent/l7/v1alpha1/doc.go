// Package v1alpha1 holds the Go types of the nodemesh traffic API group
// (traffic.nodemesh.io/v1alpha1): TrafficPolicy, which adds to the L7
// handling of opted-in Services what the Gateway API does not cover: fault
// injection (delay and abort, by percentage) and local rate limiting (a
// token bucket per destination Service, optionally per source identity).
//
// The types carry DeepCopy methods and register with a runtime.Scheme. The
// CRD manifest (traffic.nodemesh.io_trafficpolicies.yaml) is not in
// manifests/crds yet (docs/l7.md, Status); the meaning of the fields is implemented in package agent/l7/resilience
// and documented in docs/l7.md.
//
// +k8s:deepcopy-gen=package
// +groupName=traffic.nodemesh.io
package v1alpha1
