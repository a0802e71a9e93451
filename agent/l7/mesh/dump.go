package mesh

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/l7/resilience"
	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Dump is the agent's /config_dump/l7: the routes and TrafficPolicies it
// applies, per Service, and those it refused with the reason
// (`nodemeshctl routes` reads it).
type Dump struct {
	Routes          []RouteDump  `json:"routes"`
	TrafficPolicies []PolicyDump `json:"trafficPolicies"`
	Refused         []Refusal    `json:"refused"`
	// MirrorsDropped counts the mirrored copies not sent (every slot
	// taken, a body too large, the client's connection gone).
	MirrorsDropped uint64 `json:"mirrorsDropped"`
}

// RouteDump is one route attached to one Service.
type RouteDump struct {
	Service string `json:"service"`        // namespace/name
	Port    uint16 `json:"port,omitempty"` // the parentRef's port; absent: every port
	// OptedIn is false when the Service is not handled at L7: then the
	// route does nothing.
	OptedIn bool   `json:"optedIn"`
	Kind    string `json:"kind"`
	Route   string `json:"route"` // namespace/name
	// ClientNamespace is set for a consumer route: it applies to clients
	// in that namespace only (and wins over the producer's routes there).
	ClientNamespace string     `json:"clientNamespace,omitempty"`
	Rules           []RuleDump `json:"rules"`
}

// RuleDump is one rule of a route.
type RuleDump struct {
	Index    int      `json:"index"`
	Name     string   `json:"name,omitempty"`
	Matches  []string `json:"matches"`
	Backends []string `json:"backends,omitempty"`
	Filters  []string `json:"filters,omitempty"`
	// Refused says why matching requests get 500.
	Refused string `json:"refused,omitempty"`
	// Warning says which of the requests of a rule that is not refused
	// get 500 all the same: invalid backendRefs, or none.
	Warning string `json:"warning,omitempty"`
}

// PolicyDump is the TrafficPolicy that applies to a Service.
type PolicyDump struct {
	Service string `json:"service"`
	OptedIn bool   `json:"optedIn"`
	Policy  string `json:"policy"` // namespace/name
	Does    string `json:"does"`
}

// Refusal is a route or TrafficPolicy, or a part of one, that the agent
// does not apply as written.
type Refusal struct {
	Kind   string `json:"kind"`
	Object string `json:"object"` // namespace/name
	Reason string `json:"reason"`
}

// Dump describes what the layer applies in snap, as compiled by routes and
// traffic.
func (l *Layer) Dump(snap *state.Snapshot, routes *Routes, traffic *Traffic) *Dump {
	d := &Dump{Routes: []RouteDump{}, TrafficPolicies: []PolicyDump{}, Refused: []Refusal{}, MirrorsDropped: l.mirrorsDropped.Load()}
	optedIn := func(k route.ServiceKey) bool {
		svc := snap.Service(k.Namespace, k.Name)
		return svc != nil && l7.ServiceOptedIn(snap, svc)
	}
	for _, a := range routes.Table(snap).Attachments() {
		rd := RouteDump{Service: a.Service.String(), Port: a.Port, OptedIn: optedIn(a.Service), Kind: a.Route.Kind,
			Route: a.Route.Namespace + "/" + a.Route.Name, ClientNamespace: a.ClientNamespace, Rules: []RuleDump{}}
		for _, r := range a.Rules {
			ru := RuleDump{Index: r.Index, Name: r.Name, Matches: r.Matches, Filters: r.Filters()}
			for _, b := range r.Backends {
				ru.Backends = append(ru.Backends, b.String())
			}
			if r.Refused != nil {
				ru.Refused = r.Refused.Error()
			}
			ru.Warning = backendWarning(r)
			rd.Rules = append(rd.Rules, ru)
		}
		d.Routes = append(d.Routes, rd)
	}
	set := traffic.Set(snap)
	for _, k := range set.Services() {
		p := set.For(k)
		d.TrafficPolicies = append(d.TrafficPolicies, PolicyDump{Service: k.String(), OptedIn: optedIn(k),
			Policy: p.Ref.Namespace + "/" + p.Ref.Name, Does: p.String()})
	}
	for _, err := range append(routes.Problems(), traffic.Problems()...) {
		var rp route.Problem
		var tp resilience.Problem
		switch {
		case errors.As(err, &rp):
			d.Refused = append(d.Refused, Refusal{Kind: rp.Route.Kind, Object: rp.Route.Namespace + "/" + rp.Route.Name, Reason: rp.Err.Error()})
		case errors.As(err, &tp):
			d.Refused = append(d.Refused, Refusal{Kind: "TrafficPolicy", Object: tp.Ref.Namespace + "/" + tp.Ref.Name, Reason: tp.Err.Error()})
		default:
			d.Refused = append(d.Refused, Refusal{Reason: err.Error()})
		}
	}
	slices.SortStableFunc(d.Refused, func(a, b Refusal) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Object, b.Object))
	})
	return d
}

// backendWarning says when a rule's backends make requests fail: the rule
// has none (and no redirect), or some are invalid or weigh nothing.
func backendWarning(r *route.Rule) string {
	if r.Redirect != nil {
		return ""
	}
	if len(r.Backends) == 0 {
		return "no backendRefs: its requests get 500"
	}
	invalid, weight := 0, int64(0)
	for _, b := range r.Backends {
		if b.Invalid != nil {
			invalid++
		} else {
			weight += int64(b.Weight)
		}
	}
	switch {
	case invalid == len(r.Backends):
		return "every backendRef is invalid: its requests get 500"
	case weight == 0:
		return "no valid backendRef has weight: its requests get 500"
	case invalid > 0:
		return fmt.Sprintf("%d of %d backendRefs invalid: their share of requests gets 500", invalid, len(r.Backends))
	}
	return ""
}
