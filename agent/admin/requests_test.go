package admin

import (
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Each request lands in the series whose labels are the connection's
// (Conn.labels) with the request's protocol, flags, status and gRPC status,
// whatever order the cached label values are kept in; requests with equal
// labels share a series.
func TestRequestSeriesLabels(t *testing.T) {
	if len(RequestLabelNames) != len(requestKey{}) {
		t.Fatalf("%d request labels, requestKey holds %d", len(RequestLabelNames), len(requestKey{}))
	}
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Every label a distinct value, so that a value in the wrong place
	// shows.
	c := &Conn{Reporter: ReporterDestination, Src: netip.MustParseAddrPort("10.0.0.1:1234"), Dst: netip.MustParseAddrPort("10.0.0.2:80"),
		Source:      Peer{Workload: "sw", Namespace: "sns", Principal: "spiffe://td/s", CanonicalService: "scs", CanonicalRevision: "scr", Cluster: "sc"},
		Destination: Peer{Workload: "dw", Namespace: "dns", Principal: "spiffe://td/d", CanonicalService: "dcs", CanonicalRevision: "dcr", Cluster: "dc"},
		DstService:  "web.shop.svc.cluster.local", DstServiceName: "web", DstServiceNamespace: "shop", SecurityPolicy: SecurityMutualTLS}
	reqs := []*Request{
		{Conn: *c, Protocol: "http", Method: "GET", Path: "/a", Status: 200, Duration: 3 * time.Millisecond, ResponseBytes: 10},
		{Conn: *c, Protocol: "http", Method: "GET", Path: "/b", Status: 200, Duration: time.Millisecond, ResponseBytes: 5},
		{Conn: *c, Protocol: "grpc", Status: 200, GRPCStatus: "7", Flags: "RBAC"},
		{Conn: Conn{}, Protocol: "http", Status: 999},
	}
	for _, r := range reqs {
		m.Request(r)
	}
	want := func(r *Request) map[string]string {
		l := r.Conn.labels()
		l["request_protocol"] = r.Protocol
		l["response_flags"] = orFlags(r.Flags)
		l["response_code"] = statusLabel(r.Status)
		l["grpc_response_status"] = r.GRPCStatus
		return l
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		if len(mf.GetMetric()) != 3 {
			t.Fatalf("%d series, want 3 (the first two requests share one)", len(mf.GetMetric()))
		}
		for _, s := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range s.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			matched := false
			for i, r := range reqs[1:] {
				w := want(r)
				if equalLabels(got, w) {
					matched = true
					wantCount := 1.0
					if i == 0 {
						wantCount = 2
					}
					if v := s.GetCounter().GetValue(); v != wantCount {
						t.Errorf("series %v counts %v, want %v", got, v, wantCount)
					}
				}
			}
			if !matched {
				t.Errorf("series %v matches no request's labels", got)
			}
			found++
		}
	}
	if found != 3 {
		t.Fatalf("found %d request series, want 3", found)
	}
	if statusLabel(404) != "404" || statusLabel(-1) != "-1" || statusLabel(1000) != "1000" {
		t.Error("statusLabel differs from strconv.Itoa")
	}
}

func equalLabels(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// A request's metrics allocate nothing once its series exist.
func BenchmarkRequestMetrics(b *testing.B) {
	m, err := NewMetrics(prometheus.NewRegistry(), nil)
	if err != nil {
		b.Fatal(err)
	}
	c := &Conn{Reporter: ReporterSource, Source: Peer{Workload: "sw", Namespace: "sns", Principal: "spiffe://td/s"},
		Destination: Peer{Workload: "dw", Namespace: "dns"}, DstService: "web.shop.svc.cluster.local", SecurityPolicy: SecurityMutualTLS}
	r := &Request{Conn: *c, Protocol: "http", Status: 200, Duration: time.Millisecond, ResponseBytes: 100}
	b.ReportAllocs()
	for b.Loop() {
		m.Request(r)
	}
}
