package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TrafficPolicy adds fault injection and local rate limiting to the
// requests sent to the Services it targets. It takes effect only for
// Services opted in to L7 (docs/l7.md) and is applied by the client's agent.
//
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
type TrafficPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec TrafficPolicySpec `json:"spec"`
}

// TrafficPolicySpec is the desired behaviour of a TrafficPolicy.
type TrafficPolicySpec struct {
	// TargetRefs are the Services, in the policy's namespace, the policy
	// applies to (Gateway API policy attachment).
	TargetRefs []TargetRef `json:"targetRefs"`
	// Fault injects delays and errors into a share of the requests.
	Fault *Fault `json:"fault,omitempty"`
	// RateLimit limits the requests each client agent sends.
	RateLimit *RateLimit `json:"rateLimit,omitempty"`
}

// TargetRef names a Service: group "" (core), kind Service.
type TargetRef struct {
	Group string `json:"group"`
	Kind  string `json:"kind"`
	Name  string `json:"name"`
}

// Fault is fault injection: a delay, an abort, or both (a request can be
// delayed and then aborted).
type Fault struct {
	Delay *FaultDelay `json:"delay,omitempty"`
	Abort *FaultAbort `json:"abort,omitempty"`
}

// FaultDelay holds Percentage percent of requests for FixedDelay before
// they are sent.
type FaultDelay struct {
	// Percentage of requests delayed, 0 to 100 (decimals allowed).
	Percentage float64 `json:"percentage"`
	// FixedDelay is a Gateway API duration, e.g. 500ms.
	FixedDelay string `json:"fixedDelay"`
}

// FaultAbort answers Percentage percent of requests with HTTPStatus (or,
// for gRPC requests, GRPCStatus) without sending them.
type FaultAbort struct {
	// Percentage of requests aborted, 0 to 100 (decimals allowed).
	Percentage float64 `json:"percentage"`
	// HTTPStatus is the status of aborted requests, 200 to 599.
	HTTPStatus int32 `json:"httpStatus,omitempty"`
	// GRPCStatus is the gRPC status code (1 to 16) of aborted gRPC
	// requests; when unset they get HTTPStatus mapped as gRPC does.
	GRPCStatus *int32 `json:"grpcStatus,omitempty"`
}

// RateLimit is a token bucket: RequestsPerSecond tokens are added per
// second, up to Burst; each request takes one, and a request that finds
// none gets 429.
type RateLimit struct {
	RequestsPerSecond int32 `json:"requestsPerSecond"`
	// Burst is the bucket's size; 0 means RequestsPerSecond.
	Burst int32 `json:"burst,omitempty"`
	// PerSource keeps one bucket per client identity (SPIFFE ID) instead of
	// one per Service.
	PerSource bool `json:"perSource,omitempty"`
}

// TrafficPolicyList is a list of TrafficPolicy.
//
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
type TrafficPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []TrafficPolicy `json:"items"`
}
