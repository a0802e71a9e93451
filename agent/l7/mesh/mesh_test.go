package mesh

import (
	"io"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/l7/authz"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

func denyAll(*proxy.Flow, *authz.Request) proxy.Decision { return proxy.Decision{} }

// The destination claims a pod's port when an opted-in Service targets it,
// and follows the state as it changes.
func TestInboundPort(t *testing.T) {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop"})
		tx.SetPod(&state.Pod{Namespace: "shop", Name: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.1")}})
		tx.SetService(&state.Service{Namespace: "shop", Name: "web", Labels: map[string]string{l7.LabelL7: l7.ValueEnabled},
			ClusterIPs: []netip.Addr{ip("10.96.0.1")},
			Ports: []state.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"},
				{Name: "grpc", Port: 90, TargetPort: 9090, Protocol: "TCP", AppProtocol: "grpc"},
				{Name: "tls", Port: 443, TargetPort: 8443, Protocol: "TCP", AppProtocol: "https"}}})
		tx.SetEndpointSlice(&state.EndpointSlice{Namespace: "shop", Name: "web-1", Service: "web",
			Ports:     []state.EndpointPort{{Name: "http", Port: 8080}, {Name: "grpc", Port: 9090}, {Name: "tls", Port: 8443}},
			Endpoints: []state.Endpoint{{Addresses: []netip.Addr{ip("10.0.0.1")}, Ready: true, Pod: &state.Key{Namespace: "shop", Name: "web"}}}})
	})
	layer, err := New(Config{State: st.Snapshot, Authorize: denyAll})
	if err != nil {
		t.Fatal(err)
	}
	w := &proxy.Workload{Namespace: "shop", Name: "web"}
	for _, tc := range []struct {
		port  uint16
		ok    bool
		proto l7.Protocol
	}{{8080, true, l7.Undeclared}, {9090, true, l7.GRPC}, {8443, false, 0}, {80, false, 0}} {
		p, ok := layer.InboundPort(w, tc.port)
		if ok != tc.ok || p != tc.proto {
			t.Errorf("port %d: %v %v, want %v %v", tc.port, p, ok, tc.proto, tc.ok)
		}
	}
	if _, ok := layer.InboundPort(&proxy.Workload{Namespace: "shop", Name: "other"}, 8080); ok {
		t.Error("a pod no opted-in Service targets is claimed")
	}
	// Opting out takes effect with the next Refresh, which the agent
	// makes on every state change.
	st.Update(func(tx *state.Tx) {
		s := *st.Snapshot().Service("shop", "web")
		s.Labels = map[string]string{l7.LabelL7: l7.ValueDisabled}
		tx.SetService(&s)
	})
	layer.Refresh(st.Snapshot())
	if _, ok := layer.InboundPort(w, 8080); ok {
		t.Error("port still claimed after the Service opted out")
	}
	if idx := layer.index.Load(); idx.claims.Pods() != 0 {
		t.Errorf("nothing is opted in, but the index holds %d pods (the L4 path should find none)", idx.claims.Pods())
	}
}

// With nothing opted in, the L4 path's InboundPort is a load and a
// count: no allocation, no rebuild per state version.
func BenchmarkInboundPortNothingOptedIn(b *testing.B) {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		b.Fatal(err)
	}
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop"})
		tx.SetService(&state.Service{Namespace: "shop", Name: "web", Ports: []state.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"}}})
	})
	layer, err := New(Config{State: st.Snapshot, Authorize: denyAll})
	if err != nil {
		b.Fatal(err)
	}
	layer.Refresh(st.Snapshot())
	w := &proxy.Workload{Namespace: "shop", Name: "web"}
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := layer.InboundPort(w, 8080); ok {
			b.Fatal("claimed")
		}
	}
}

// An attempt's response body ends the attempt's context and its hold on
// the endpoint once, however often it is closed.
func TestReleaseBodyOnce(t *testing.T) {
	var cancels, releases, closes int
	b := &releaseBody{
		ReadCloser: closeCounter{&closes},
		cancel:     func() { cancels++ },
		release:    func() { releases++ },
	}
	for range 3 {
		_ = b.Close()
	}
	if cancels != 1 || releases != 1 || closes != 3 {
		t.Fatalf("3 closes: %d cancels, %d releases, %d closes of the body; want 1, 1, 3", cancels, releases, closes)
	}
}

type closeCounter struct{ n *int }

func (closeCounter) Read([]byte) (int, error) { return 0, io.EOF }
func (c closeCounter) Close() error           { *c.n++; return nil }
