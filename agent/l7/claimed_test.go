package l7

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/state"
)

// ClaimedPorts looks only at opted-in Services; when several target one
// pod port, a declared protocol wins over detection and, between declared
// ones, the Service first by namespace and name wins, whatever order the
// snapshot holds them in.
func TestClaimedPorts(t *testing.T) {
	ip := netip.MustParseAddr
	for _, tc := range []struct {
		name string
		svcs map[string]string // Service name -> appProtocol ("-" not opted in)
		want Protocol
		ok   bool
	}{
		{"undeclared only", map[string]string{"a": ""}, Undeclared, true},
		{"declared wins, first", map[string]string{"a": "http", "b": ""}, HTTP1, true},
		{"declared wins, second", map[string]string{"a": "", "b": "grpc"}, GRPC, true},
		{"first declared by name", map[string]string{"a": "grpc", "b": "http"}, GRPC, true},
		{"first declared by name, reversed", map[string]string{"a": "http", "b": "grpc"}, HTTP1, true},
		{"not opted in ignored", map[string]string{"a": "-", "b": "h2c"}, H2C, true},
		{"nothing opted in", map[string]string{"a": "-"}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
			if err != nil {
				t.Fatal(err)
			}
			st.Update(func(tx *state.Tx) {
				tx.SetNamespace(&state.Namespace{Name: "shop"})
				tx.SetPod(&state.Pod{Namespace: "shop", Name: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.1")}})
				i := 0
				for name, app := range tc.svcs {
					i++
					labels := map[string]string{LabelL7: ValueEnabled}
					if app == "-" {
						labels, app = nil, "http"
					}
					tx.SetService(&state.Service{Namespace: "shop", Name: name, Labels: labels,
						ClusterIPs: []netip.Addr{ip(fmt.Sprintf("10.96.0.%d", i))},
						Ports:      []state.ServicePort{{Name: "p", Port: 80, TargetPort: 8080, Protocol: "TCP", AppProtocol: app}}})
					tx.SetEndpointSlice(&state.EndpointSlice{Namespace: "shop", Name: name + "-1", Service: name,
						Ports:     []state.EndpointPort{{Name: "p", Port: 8080}},
						Endpoints: []state.Endpoint{{Addresses: []netip.Addr{ip("10.0.0.1")}, Ready: true, Pod: &state.Key{Namespace: "shop", Name: "web"}}}})
				}
			})
			ports := ClaimedPorts(st.Snapshot())
			if !tc.ok {
				if ports != nil {
					t.Fatalf("claimed %v, want nil", ports)
				}
				return
			}
			got, ok := ports[state.Key{Namespace: "shop", Name: "web"}][8080]
			if !ok || got != tc.want {
				t.Errorf("port 8080: %v %v, want %v", got, ok, tc.want)
			}
		})
	}
}
