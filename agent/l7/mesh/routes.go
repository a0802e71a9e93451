package mesh

import (
	"fmt"
	"sync"

	"k8s.io/apimachinery/pkg/runtime"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/nodemesh/nodemesh/agent/l7/resilience"
	"github.com/nodemesh/nodemesh/agent/l7/route"
	l7v1alpha1 "github.com/nodemesh/nodemesh/agent/l7/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Gateway API kinds read from the state's custom objects.
var (
	HTTPRouteKind = state.GroupKind{Group: gwv1.GroupName, Kind: "HTTPRoute"}
	GRPCRouteKind = state.GroupKind{Group: gwv1.GroupName, Kind: "GRPCRoute"}
)

// TrafficPolicyKind is read from the state's custom objects.
var TrafficPolicyKind = state.GroupKind{Group: l7v1alpha1.GroupName, Kind: "TrafficPolicy"}

// Traffic compiles the TrafficPolicies of a state snapshot, once per
// snapshot version. An object that does not decode is reported and does
// nothing (faults and limits only take traffic away).
type Traffic struct {
	mu       sync.Mutex
	version  uint64
	set      *resilience.Set
	problems []error
}

// Set returns the compiled TrafficPolicies of snap.
func (tr *Traffic) Set(snap *state.Snapshot) *resilience.Set {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.set != nil && tr.version == snap.Version() {
		return tr.set
	}
	var tps []*l7v1alpha1.TrafficPolicy
	var problems []error
	for _, o := range snap.Objects(TrafficPolicyKind) {
		tp := &l7v1alpha1.TrafficPolicy{}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Content, tp); err != nil {
			problems = append(problems, resilience.Problem{Ref: resilience.Ref{Namespace: o.Namespace, Name: o.Name},
				Err: fmt.Errorf("decoding: %w", err)})
			continue
		}
		tps = append(tps, tp)
	}
	tr.set, tr.version = resilience.Compile(tps), snap.Version()
	for _, p := range tr.set.Problems() {
		problems = append(problems, p)
	}
	tr.problems = problems
	return tr.set
}

// Problems lists the TrafficPolicies of the last compiled snapshot that
// were refused or lost a conflict.
func (tr *Traffic) Problems() []error {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]error(nil), tr.problems...)
}

// Routes compiles the HTTPRoutes and GRPCRoutes of a state snapshot, once
// per snapshot version. Objects that do not decode are reported by Problems
// and route nothing (a Service without a usable route gets its requests
// unrouted, as before the route existed).
type Routes struct {
	mu       sync.Mutex
	version  uint64
	table    *route.Table
	problems []error
}

// Table returns the route table of snap.
func (rs *Routes) Table(snap *state.Snapshot) *route.Table {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.table != nil && rs.version == snap.Version() {
		return rs.table
	}
	var hrs []*gwv1.HTTPRoute
	var grs []*gwv1.GRPCRoute
	var problems []error
	for _, o := range snap.Objects(HTTPRouteKind) {
		hr := &gwv1.HTTPRoute{}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Content, hr); err != nil {
			problems = append(problems, route.Problem{Route: route.RouteRef{Kind: route.KindHTTPRoute, Namespace: o.Namespace, Name: o.Name},
				Err: fmt.Errorf("decoding: %w", err)})
			continue
		}
		hrs = append(hrs, hr)
	}
	for _, o := range snap.Objects(GRPCRouteKind) {
		gr := &gwv1.GRPCRoute{}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Content, gr); err != nil {
			problems = append(problems, route.Problem{Route: route.RouteRef{Kind: route.KindGRPCRoute, Namespace: o.Namespace, Name: o.Name},
				Err: fmt.Errorf("decoding: %w", err)})
			continue
		}
		grs = append(grs, gr)
	}
	rs.table, rs.version, rs.problems = route.Compile(hrs, grs), snap.Version(), problems
	return rs.table
}

// Problems lists the route objects of the last compiled snapshot that did
// not decode, and what the compiler could not honour.
func (rs *Routes) Problems() []error {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	out := append([]error(nil), rs.problems...)
	if rs.table != nil {
		for _, p := range rs.table.Problems() {
			out = append(out, p)
		}
	}
	return out
}
