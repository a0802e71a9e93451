package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func newServer(t *testing.T, reg *prometheus.Registry) (*Server, *slog.LevelVar) {
	t.Helper()
	lv := new(slog.LevelVar)
	s, err := New(Config{Level: lv, Gatherer: reg, Info: map[string]string{"node": "n1"}})
	if err != nil {
		t.Fatal(err)
	}
	return s, lv
}

func get(t *testing.T, h http.Handler, method, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(method, path, nil)
	req.RemoteAddr = "127.0.0.1:40000" // the node itself
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

// TestMetricsAndReadinessOnlyFromTheNode: the metrics and readiness ports
// listen on every node address but answer only the node itself and, for
// metrics, the scrapers MetricsAllow admits (issue 14, item 8).
func TestMetricsAndReadinessOnlyFromTheNode(t *testing.T) {
	reg := prometheus.NewRegistry()
	lv := new(slog.LevelVar)
	scraper := netip.MustParseAddr("10.244.1.7")
	s, err := New(Config{Level: lv, Gatherer: reg, Registerer: reg, Logger: slog.New(slog.DiscardHandler),
		MetricsAllow: func(a netip.Addr) bool { return a == scraper }})
	if err != nil {
		t.Fatal(err)
	}
	s.AddReadiness("state", func(context.Context) error { return nil })
	node := &net.TCPAddr{IP: net.ParseIP("10.0.0.1"), Port: 15020}
	for _, tc := range []struct {
		name, remote     string
		metrics, readyOK int
	}{
		{"loopback", "127.0.0.1:5000", 200, 200},
		{"the node's own address (kubelet, hostNetwork pods)", "10.0.0.1:5000", 200, 200},
		{"v4-mapped node address", "[::ffff:10.0.0.1]:5000", 200, 200},
		{"a pod", "10.244.1.9:5000", 403, 403},
		{"another node", "10.0.0.2:5000", 403, 403},
		{"an allowed scraper", scraper.String() + ":5000", 200, 403},
	} {
		for _, h := range []struct {
			name string
			h    http.Handler
			path string
			want int
		}{{"metrics", s.MetricsHandler(), "/metrics", tc.metrics}, {"readiness", s.ReadinessHandler(), "/healthz/ready", tc.readyOK}} {
			rec := httptest.NewRecorder()
			req := httptest.NewRequest("GET", h.path, nil)
			req.RemoteAddr = tc.remote
			req = req.WithContext(context.WithValue(req.Context(), http.LocalAddrContextKey, node))
			h.h.ServeHTTP(rec, req)
			if rec.Code != h.want {
				t.Errorf("%s from %s: %d %q, want %d", h.name, tc.name, rec.Code, rec.Body, h.want)
			}
			if rec.Code == 403 && !strings.Contains(rec.Body.String(), "only the node itself") {
				t.Errorf("%s refusal without a reason: %q", h.name, rec.Body)
			}
		}
	}
	if got := testutil.ToFloat64(s.guard.refused.WithLabelValues("metrics")); got != 2 {
		t.Errorf("refused metrics requests counted %v, want 2", got)
	}
	if got := testutil.ToFloat64(s.guard.refused.WithLabelValues("readiness")); got != 3 {
		t.Errorf("refused readiness requests counted %v, want 3", got)
	}
}

func TestReadiness(t *testing.T) {
	s, _ := newServer(t, prometheus.NewRegistry())
	h := s.ReadinessHandler()
	if code, body := get(t, h, "GET", "/healthz/ready"); code != 503 || !strings.Contains(body, "no readiness checks") {
		t.Fatalf("no checks: %d %q", code, body)
	}
	svids := errors.New("1 of 2 SVIDs missing")
	s.AddReadiness("state", func(context.Context) error { return nil })
	s.AddReadiness("svids", func(context.Context) error { return svids })
	if code, body := get(t, h, "GET", "/healthz/ready"); code != 503 || !strings.Contains(body, "svids: not ready: 1 of 2 SVIDs missing") || !strings.Contains(body, "state: ready") {
		t.Fatalf("one failing: %d %q", code, body)
	}
	svids = nil
	if code, body := get(t, h, "GET", "/healthz/ready"); code != 200 {
		t.Fatalf("all ready: %d %q", code, body)
	}
	// A check that hangs is cut by the timeout, and counts as not ready.
	s.cfg.CheckTimeout = 50 * time.Millisecond
	s.AddReadiness("capture", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() })
	if code, body := get(t, h, "GET", "/healthz/ready"); code != 503 || !strings.Contains(body, "deadline") {
		t.Fatalf("hanging check: %d %q", code, body)
	}
}

func TestConfigDumpAndStatus(t *testing.T) {
	s, _ := newServer(t, prometheus.NewRegistry())
	s.AddDump("workloads", func() any { return []string{"ns/a"} })
	s.AddDump("certificates", func() any { return map[string]string{"spiffe://x/ns/a/sa/b": "2026-01-01T00:00:00Z"} })
	s.SetConnections(func() any { return []int{1, 2} })
	s.AddReadiness("state", func(context.Context) error { return nil })
	h := s.AdminHandler()

	code, body := get(t, h, "GET", "/config_dump")
	var all map[string]json.RawMessage
	if code != 200 || json.Unmarshal([]byte(body), &all) != nil || len(all) != 2 {
		t.Fatalf("dump: %d %q", code, body)
	}
	if code, body := get(t, h, "GET", "/config_dump/workloads"); code != 200 || !strings.Contains(body, "ns/a") {
		t.Fatalf("section: %d %q", code, body)
	}
	if code, body := get(t, h, "GET", "/config_dump/nope"); code != 404 || !strings.Contains(body, "sections: certificates, workloads") {
		t.Fatalf("missing section: %d %q", code, body)
	}
	if code, body := get(t, h, "GET", "/connections"); code != 200 || strings.Join(strings.Fields(body), "") != "[1,2]" {
		t.Fatalf("connections: %d %q", code, body)
	}
	code, body = get(t, h, "GET", "/status")
	var st Status
	if code != 200 || json.Unmarshal([]byte(body), &st) != nil || !st.Ready || st.Info["node"] != "n1" || st.LogLevel != "info" {
		t.Fatalf("status: %d %q", code, body)
	}
	if code, _ := get(t, h, "GET", "/debug/pprof/goroutine?debug=1"); code != 200 {
		t.Fatalf("pprof: %d", code)
	}
	if code, _ := get(t, h, "DELETE", "/config_dump"); code < 400 {
		t.Fatalf("DELETE served: %d", code)
	}
	// Handlers added later (while serving) are found; others are 404.
	s.Handle("/policy/explain", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "explained "+r.URL.Query().Get("src"))
	}))
	if code, body := get(t, h, "GET", "/policy/explain?src=a"); code != 200 || body != "explained a" {
		t.Fatalf("added handler: %d %q", code, body)
	}
	if code, _ := get(t, h, "GET", "/nope"); code != 404 {
		t.Fatalf("unknown path: %d", code)
	}
}

func TestLogLevel(t *testing.T) {
	s, lv := newServer(t, prometheus.NewRegistry())
	h := s.AdminHandler()
	tests := []struct {
		method, path string
		code         int
		want         slog.Level
	}{
		{"GET", "/logging", 200, slog.LevelInfo},
		{"POST", "/logging?level=debug", 200, slog.LevelDebug},
		{"POST", "/logging?level=WARNING", 200, slog.LevelWarn},
		{"POST", "/logging?level=verbose", 400, slog.LevelWarn},
		{"POST", "/logging?level=info+4", 400, slog.LevelWarn},
		{"POST", "/logging", 400, slog.LevelWarn},
		{"POST", "/logging?level=error", 200, slog.LevelError},
	}
	for _, tt := range tests {
		code, body := get(t, h, tt.method, tt.path)
		if code != tt.code || lv.Level() != tt.want {
			t.Fatalf("%s %s: %d %q, level %v", tt.method, tt.path, code, body, lv.Level())
		}
	}
}

func TestMetricsAndAccessLog(t *testing.T) {
	reg := prometheus.NewRegistry()
	var buf bytes.Buffer
	m, err := NewMetrics(reg, NewAccessLog(&buf))
	if err != nil {
		t.Fatal(err)
	}
	m.SetPoolStats(func() PoolStats {
		return PoolStats{Hits: 5, Misses: 2, Handshakes: 2, HandshakeErrors: 1, ScaleOuts: 4, ResponseTimeouts: 6, PingTimeouts: 7, ExpiredConns: 15, Conns: 1, Streams: 3}
	})
	m.SetTunnelStats(func() TunnelStats {
		return TunnelStats{Conns: 2, HandshakesInFlight: 1, Streams: 9, Handshakes: 11, HandshakeErrors: 12, ExpiredConns: 16,
			Limits: map[string]uint64{"flood": 13, "header_size": 14}}
	})
	c := &Conn{Reporter: ReporterSource, Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.0.0.2:8080"),
		Source:      Peer{Workload: "client", Namespace: "shop", Principal: "spiffe://cluster.local/ns/shop/sa/client", CanonicalService: "client", CanonicalRevision: "v1", Cluster: "Kubernetes"},
		Destination: Peer{Workload: "web", Namespace: "shop", Principal: "spiffe://cluster.local/ns/shop/sa/web", CanonicalService: "web", CanonicalRevision: "latest", Cluster: "Kubernetes"},
		DstService:  "web.shop.svc.cluster.local", DstServiceName: "web", DstServiceNamespace: "shop",
		SecurityPolicy: SecurityMutualTLS, Start: time.Now()}
	// The second connection's last bytes arrive through the flush a
	// scrape runs.
	m.Opened(c).Add(60, 1500)
	tr := m.Opened(c)
	var flushes int
	m.SetFlush(func() { flushes++; tr.Add(40, 500) })
	m.Closed(c, 100, 2000, "eof")
	refused := *c
	refused.Reporter, refused.ResponseFlags = ReporterDestination, FlagsDeny
	m.Refused(&refused, "policy", "denied by test")
	m.Setup("outbound", "ok", 3*time.Millisecond)
	m.Denied("inbound", "policy")
	m.SetCaptureStatus("shop", "web-0", "enrolled")
	m.SetCaptureStatus("shop", "web-0", "failed")
	m.SetCaptureStatus("shop", "web-1", "enrolled")
	m.SetCaptureStatus("shop", "web-1", "")

	s, _ := newServer(t, reg)
	code, body := get(t, s.MetricsHandler(), "GET", "/metrics")
	if code != 200 {
		t.Fatalf("metrics: %d", code)
	}
	for _, want := range []string{
		`istio_tcp_connections_opened_total{connection_security_policy="mutual_tls",destination_app="web",destination_canonical_revision="latest",destination_canonical_service="web",destination_cluster="Kubernetes",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="web.shop.svc.cluster.local",destination_service_name="web",destination_service_namespace="shop",destination_version="latest",destination_workload="web",destination_workload_namespace="shop",reporter="source",request_protocol="tcp",response_flags="-",source_app="client",source_canonical_revision="v1",source_canonical_service="client",source_cluster="Kubernetes",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_version="v1",source_workload="client",source_workload_namespace="shop"} 2`,
		// Istio's directions: received is request bytes, sent response bytes.
		`istio_tcp_received_bytes_total{connection_security_policy="mutual_tls",destination_app="web",destination_canonical_revision="latest",destination_canonical_service="web",destination_cluster="Kubernetes",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="web.shop.svc.cluster.local",destination_service_name="web",destination_service_namespace="shop",destination_version="latest",destination_workload="web",destination_workload_namespace="shop",reporter="source",request_protocol="tcp",response_flags="-",source_app="client",source_canonical_revision="v1",source_canonical_service="client",source_cluster="Kubernetes",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_version="v1",source_workload="client",source_workload_namespace="shop"} 100`,
		`istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls",destination_app="web",destination_canonical_revision="latest",destination_canonical_service="web",destination_cluster="Kubernetes",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="web.shop.svc.cluster.local",destination_service_name="web",destination_service_namespace="shop",destination_version="latest",destination_workload="web",destination_workload_namespace="shop",reporter="source",request_protocol="tcp",response_flags="-",source_app="client",source_canonical_revision="v1",source_canonical_service="client",source_cluster="Kubernetes",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_version="v1",source_workload="client",source_workload_namespace="shop"} 2000`,
		// A refusal: opened with "-", closed with DENY, as ztunnel counts it.
		`reporter="destination",request_protocol="tcp",response_flags="-",`,
		`reporter="destination",request_protocol="tcp",response_flags="DENY",`,
		`nodemesh_tunnel_handshakes_total{result="ok"} 2`,
		`nodemesh_tunnel_handshakes_total{result="error"} 1`,
		`nodemesh_pool_requests_total{result="hit"} 5`,
		`nodemesh_pool_requests_total{result="miss"} 2`,
		`nodemesh_pool_scale_outs_total 4`,
		`nodemesh_pool_timeouts_total{reason="response"} 6`,
		`nodemesh_pool_timeouts_total{reason="ping"} 7`,
		`nodemesh_tunnel_server_connections 3`,
		`nodemesh_tunnel_server_streams 9`,
		`nodemesh_tunnel_server_handshakes_total{result="ok"} 11`,
		`nodemesh_tunnel_server_handshakes_total{result="error"} 12`,
		`nodemesh_tunnel_limit_hits_total{limit="flood"} 13`,
		`nodemesh_tunnel_limit_hits_total{limit="header_size"} 14`,
		`nodemesh_tunnel_limit_hits_total{limit="streams"} 0`,
		`nodemesh_tunnel_cert_expiry_drains_total{side="client"} 15`,
		`nodemesh_tunnel_cert_expiry_drains_total{side="server"} 16`,
		`nodemesh_connection_setup_seconds_count{direction="outbound",outcome="ok"} 1`,
		`nodemesh_connections_denied_total{direction="inbound",reason="policy"} 2`,
		`nodemesh_capture_status{namespace="shop",pod="web-0",status="failed"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if strings.Contains(body, `status="enrolled"`) {
		t.Error("stale capture status still exported")
	}
	if n := testutil.CollectAndCount(reg, "istio_tcp_received_bytes_total"); n != 1 {
		t.Errorf("%d received series", n)
	}
	if flushes < 1 {
		t.Error("a scrape did not flush open connections' bytes")
	}
	if n := testutil.CollectAndCount(reg, "istio_tcp_connections_closed_total"); n != 2 {
		t.Errorf("%d closed series, want 2 (response_flags - and DENY)", n)
	}
	if code, _ := get(t, s.MetricsHandler(), "GET", "/stats/prometheus"); code != 200 {
		t.Error("Istio's metrics path missing")
	}

	var rec map[string]any
	if err := json.NewDecoder(&buf).Decode(&rec); err != nil {
		t.Fatalf("access log does not start with a JSON object: %v: %q", err, buf.String())
	}
	for k, v := range map[string]any{"msg": "connection", "src_spiffe_id": "spiffe://cluster.local/ns/shop/sa/client",
		"dst_spiffe_id": "spiffe://cluster.local/ns/shop/sa/web", "bytes_sent": 100.0, "bytes_received": 2000.0,
		"close_reason": "eof", "src": "10.0.0.1:40000", "dst": "10.0.0.2:8080", "security": "mutual_tls"} {
		if rec[k] != v {
			t.Errorf("access log %s = %v, want %v", k, rec[k], v)
		}
	}
	if _, ok := rec["duration_ms"]; !ok {
		t.Error("access log lacks duration")
	}
	if _, err := NewMetrics(reg, nil); err == nil {
		t.Error("registering twice succeeded")
	}
}

func TestRun(t *testing.T) {
	s, _ := newServer(t, prometheus.NewRegistry())
	s.AddReadiness("x", func(context.Context) error { return nil })
	// Find free ports, then hand them to Run.
	addrs := make([]string, 3)
	for i := range addrs {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs[i] = ln.Addr().String()
		ln.Close()
	}
	s.cfg.AdminAddr, s.cfg.MetricsAddr, s.cfg.ReadinessAddr = addrs[0], addrs[1], addrs[2]
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	deadline := time.Now().Add(30 * time.Second)
	for _, u := range []string{"http://" + addrs[0] + "/status", "http://" + addrs[1] + "/metrics", "http://" + addrs[2] + "/healthz/ready"} {
		for {
			resp, err := http.Get(u)
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Fatalf("%s: %s", u, resp.Status)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %v", u, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// A taken address is an error naming it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s.cfg.AdminAddr = ln.Addr().String()
	if err := s.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "listening for admin") {
		t.Fatalf("Run on a taken port: %v", err)
	}
}
