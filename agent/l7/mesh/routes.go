package mesh

import (
	"fmt"
	"sync"

	"k8s.io/apimachinery/pkg/runtime"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Gateway API kinds read from the state's custom objects.
var (
	HTTPRouteKind = state.GroupKind{Group: gwv1.GroupName, Kind: "HTTPRoute"}
	GRPCRouteKind = state.GroupKind{Group: gwv1.GroupName, Kind: "GRPCRoute"}
)

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
			problems = append(problems, fmt.Errorf("HTTPRoute %s: %w", o.Key(), err))
			continue
		}
		hrs = append(hrs, hr)
	}
	for _, o := range snap.Objects(GRPCRouteKind) {
		gr := &gwv1.GRPCRoute{}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Content, gr); err != nil {
			problems = append(problems, fmt.Errorf("GRPCRoute %s: %w", o.Key(), err))
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
