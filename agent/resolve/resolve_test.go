package resolve

import (
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

func newResolver(t testing.TB, st *state.Store, capable func(string) bool, strict func(string, uint16) bool) *Resolver {
	t.Helper()
	r, err := New(Config{State: st.Snapshot, MeshCapable: capable, Strict: strict})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func everyNode(string) bool { return true }

func neverStrict(string, uint16) bool { return false }

func TestResolve(t *testing.T) {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "mesh", Labels: map[string]string{state.LabelMode: state.ModeEnabled}})
		tx.SetNamespace(&state.Namespace{Name: "plain"})
		tx.SetPod(state.WithDetail(state.Pod{Namespace: "mesh", Name: "web", ServiceAccount: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.1")}}, state.PodDetail{Annotations: map[string]string{state.AnnotationExcludeInboundPorts: "9100"}}))
		tx.SetPod(&state.Pod{Namespace: "plain", Name: "old", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.2")}})
		tx.SetService(&state.Service{Namespace: "mesh", Name: "web", ClusterIPs: []netip.Addr{ip("10.96.0.1")},
			Ports: []state.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}})
		tx.SetService(&state.Service{Namespace: "mesh", Name: "empty", ClusterIPs: []netip.Addr{ip("10.96.0.2")},
			Ports: []state.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}})
		tx.SetEndpointSlice(&state.EndpointSlice{Namespace: "mesh", Name: "web-1", Service: "web",
			Ports:     []state.EndpointPort{{Name: "http", Port: 8080}},
			Endpoints: []state.Endpoint{{Addresses: []netip.Addr{ip("10.0.0.1")}, Ready: true}, {Addresses: []netip.Addr{ip("10.0.0.2")}, Ready: true}}})
	})
	r := newResolver(t, st, everyNode, neverStrict)
	tests := []struct {
		dst       string
		service   string
		endpoints []string // addr|enrolled|identity
		err       error
	}{
		{"10.96.0.1:80", "mesh/web", []string{"10.0.0.1:8080|true|spiffe://cluster.local/ns/mesh/sa/web", "10.0.0.2:8080|false|"}, nil},
		{"10.96.0.2:80", "", nil, proxy.ErrNoEndpoints},
		{"10.0.0.1:8080", "", []string{"10.0.0.1:8080|true|spiffe://cluster.local/ns/mesh/sa/web"}, nil},
		{"10.0.0.1:9100", "", []string{"10.0.0.1:9100|false|"}, nil}, // excluded inbound port: plaintext
		{"10.0.0.2:80", "", []string{"10.0.0.2:80|false|"}, nil},
		{"192.0.2.1:443", "", []string{"192.0.2.1:443|false|"}, nil},
	}
	for _, tt := range tests {
		d, err := r.Resolve(nil, netip.MustParseAddrPort(tt.dst))
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("%s: error %v, want %v", tt.dst, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tt.dst, err)
		}
		var got []string
		for _, e := range d.Endpoints {
			id := ""
			if !e.Identity.IsZero() {
				id = e.Identity.String()
			}
			got = append(got, e.Addr.String()+"|"+strconv.FormatBool(e.Enrolled)+"|"+id)
		}
		if d.Service != tt.service || strings.Join(got, ",") != strings.Join(tt.endpoints, ",") {
			t.Errorf("%s: service %q endpoints %v, want %q %v", tt.dst, d.Service, got, tt.service, tt.endpoints)
		}
	}
}

func TestEndpointRollout(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/default")
	addr := netip.MustParseAddrPort("10.0.1.5:8080")
	pod := func(node string, enrolled bool, exclude ...uint16) *state.Pod {
		p := state.WithDetail(state.Pod{Namespace: "a", Name: "p", Node: node, Enrolled: enrolled, Ref: "a/p"}, state.PodDetail{ExcludeInboundPorts: exclude})
		if enrolled {
			p.Identity = id
		}
		return p
	}
	capable := func(node string) bool { return node == "meshed" }
	for _, tc := range []struct {
		name         string
		p            *state.Pod
		strict       bool
		wantHBONE    bool
		wantRefused  bool
		wantWorkload string
	}{
		{name: "not a pod", p: nil},
		{name: "unenrolled pod on a meshed node", p: pod("meshed", false), wantWorkload: "a/p"},
		{name: "enrolled pod on a meshed node", p: pod("meshed", true), wantHBONE: true, wantWorkload: "a/p"},
		{name: "enrolled STRICT pod on a meshed node", p: pod("meshed", true), strict: true, wantHBONE: true, wantWorkload: "a/p"},
		{name: "enrolled PERMISSIVE pod on a node without agent", p: pod("bare", true), wantWorkload: "a/p"},
		{name: "enrolled STRICT pod on a node without agent", p: pod("bare", true), strict: true, wantRefused: true, wantWorkload: "a/p"},
		{name: "excluded port on a node without agent", p: pod("bare", true, 8080), strict: true, wantWorkload: "a/p"},
	} {
		var asked bool
		r := &Resolver{cfg: Config{MeshCapable: capable, Strict: func(pod string, port uint16) bool {
			asked = true
			if pod != "a/p" || port != 8080 {
				t.Errorf("%s: strict asked for %s port %d", tc.name, pod, port)
			}
			return tc.strict
		}}}
		ep, err := r.endpoint(addr, tc.p)
		if tc.wantRefused {
			if !errors.Is(err, proxy.ErrStrictMTLS) {
				t.Errorf("%s: err = %v, want refusal", tc.name, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if ep.Enrolled != tc.wantHBONE || ep.Addr != addr || ep.Workload != tc.wantWorkload {
			t.Errorf("%s: endpoint %+v", tc.name, ep)
		}
		if ep.Enrolled && ep.Identity != id {
			t.Errorf("%s: identity %v", tc.name, ep.Identity)
		}
		if tc.wantHBONE && asked {
			t.Errorf("%s: asked for the mode of an HBONE destination", tc.name)
		}
	}
}

func TestConfigRequired(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("New with an empty config succeeded")
	}
}

func BenchmarkResolveClusterIP(b *testing.B) {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		b.Fatal(err)
	}
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "mesh", Labels: map[string]string{state.LabelMode: state.ModeEnabled}})
		var eps []state.Endpoint
		for i := range 3000 {
			ip := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
			tx.SetPod(&state.Pod{Namespace: "mesh", Name: "p" + strings.Repeat("x", i%3) + string(rune('a'+i%26)) + strconv.Itoa(i), ServiceAccount: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip}})
			if i < 10 {
				eps = append(eps, state.Endpoint{Addresses: []netip.Addr{ip}, Ready: true})
			}
		}
		tx.SetService(&state.Service{Namespace: "mesh", Name: "web", ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.1")},
			Ports: []state.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}})
		tx.SetEndpointSlice(&state.EndpointSlice{Namespace: "mesh", Name: "web-1", Service: "web",
			Ports: []state.EndpointPort{{Name: "http", Port: 8080}}, Endpoints: eps})
	})
	r := newResolver(b, st, everyNode, neverStrict)
	dst := netip.MustParseAddrPort("10.96.0.1:80")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Resolve(nil, dst); err != nil {
			b.Fatal(err)
		}
	}
}
