package resolve

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Only Services that opted in, on ports whose appProtocol does not say
// they are something else, are marked for L7.
func TestL7Target(t *testing.T) {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr
	on := map[string]string{l7.LabelL7: l7.ValueEnabled}
	off := map[string]string{l7.LabelL7: l7.ValueDisabled}
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "l7ns", Labels: on})
		tx.SetNamespace(&state.Namespace{Name: "plain"})
		tx.SetPod(&state.Pod{Namespace: "plain", Name: "p", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.1")}})
		svc := func(ns, name string, vip string, labels map[string]string, ports ...state.ServicePort) {
			tx.SetService(&state.Service{Namespace: ns, Name: name, Labels: labels, ClusterIPs: []netip.Addr{ip(vip)}, Ports: ports})
			var eps []state.EndpointPort
			for _, p := range ports {
				eps = append(eps, state.EndpointPort{Name: p.Name, Port: 8000 + p.Port})
			}
			tx.SetEndpointSlice(&state.EndpointSlice{Namespace: ns, Name: name + "-1", Service: name, Ports: eps,
				Endpoints: []state.Endpoint{{Addresses: []netip.Addr{ip("10.0.0.1")}, Ready: true}}})
		}
		svc("plain", "web", "10.96.0.1", on, state.ServicePort{Name: "http", Port: 80, AppProtocol: "http"},
			state.ServicePort{Name: "raw", Port: 81}, state.ServicePort{Name: "db", Port: 82, AppProtocol: "mysql"},
			state.ServicePort{Name: "grpc", Port: 83, AppProtocol: "grpc"})
		svc("plain", "l4", "10.96.0.2", nil, state.ServicePort{Name: "http", Port: 80, AppProtocol: "http"})
		svc("l7ns", "inherits", "10.96.0.3", nil, state.ServicePort{Name: "http", Port: 80})
		svc("l7ns", "optsout", "10.96.0.4", off, state.ServicePort{Name: "http", Port: 80})
	})
	r := newResolver(t, st, everyNode, neverStrict)
	for _, tc := range []struct {
		dst   string
		l7    bool
		proto l7.Protocol
	}{
		{"10.96.0.1:80", true, l7.HTTP1},
		{"10.96.0.1:81", true, l7.Undeclared},
		{"10.96.0.1:82", false, 0},
		{"10.96.0.1:83", true, l7.GRPC},
		{"10.96.0.2:80", false, 0},
		{"10.96.0.3:80", true, l7.Undeclared},
		{"10.96.0.4:80", false, 0},
		{"10.0.0.1:8080", false, 0}, // a pod IP: never routed at L7
	} {
		d, err := r.Resolve(nil, netip.MustParseAddrPort(tc.dst))
		if err != nil {
			t.Fatalf("%s: %v", tc.dst, err)
		}
		if (d.L7 != nil) != tc.l7 || (d.L7 != nil && d.L7.Protocol != tc.proto) {
			t.Errorf("%s: L7 %+v, want l7=%v protocol %v", tc.dst, d.L7, tc.l7, tc.proto)
		}
		if d.L7 != nil && (d.L7.Port != netip.MustParseAddrPort(tc.dst).Port() || d.Service != d.L7.Namespace+"/"+d.L7.Name) {
			t.Errorf("%s: L7 target %+v does not name the Service port (%s)", tc.dst, d.L7, d.Service)
		}
	}
}
