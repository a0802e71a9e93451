package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/l7/authz"
	"github.com/nodemesh/nodemesh/agent/l7/mesh"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// claimingLayer is the real L7 layer (agent/l7/mesh) with the inbound
// claim decided by the test: the fixture's application ports are
// ephemeral, so no Service in the cluster state targets them.
type claimingLayer struct {
	*mesh.Layer
	claim func(port uint16) bool
}

func (l *claimingLayer) InboundPort(_ *proxy.Workload, port uint16) (l7.Protocol, bool) {
	return l7.HTTP1, l.claim(port)
}

// httpApp answers every HTTP/1.1 request on c with a 2-byte body, as a
// minimal backend would, until the client closes.
var httpApp = httpAppWith("text/plain", []byte("ok"))

// httpApp1k answers every HTTP/1.1 request on c with a 1 kB body, as
// the benchmark's HTTP server does (bench/load), until the client closes.
var httpApp1k = httpAppWith("application/octet-stream", bytes.Repeat([]byte("x"), 1024))

// httpAppWith returns an application that answers every HTTP/1.1 request
// with body, until the client closes.
func httpAppWith(contentType string, body []byte) func(net.Conn) {
	header := fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n", contentType, len(body))
	return func(c net.Conn) {
		br := bufio.NewReader(c)
		bw := bufio.NewWriter(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, req.Body)
			req.Body.Close()
			bw.WriteString(header)
			bw.Write(body)
			if bw.Flush() != nil {
				return
			}
		}
	}
}

// l7Opts varies the L7 fixture.
type l7Opts struct {
	metrics bool
	// netHTTPOnly turns the lean HTTP/1.1 path off (mesh.Config.NetHTTPOnly).
	netHTTPOnly bool
	// app serves the application connections (default httpApp).
	app func(net.Conn)
}

// newL7Fixture builds the fixture's two nodes with the real L7 layer on
// both, the Service svcL7VIP opted in and its pods' application ports
// claimed, and returns an HTTP client whose connections go through pod A's
// outbound listener to svcL7VIP. With metrics set, both agents record
// Istio's request metrics (telemetry.Observer with admin.Metrics) as the
// agent does; o varies it.
func newL7Fixture(tb testing.TB, o l7Opts) (*fixture, *http.Client) {
	tb.Helper()
	metrics := o.metrics
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		tb.Fatal(err)
	}
	cfg := mesh.Config{
		State: st.Snapshot,
		// A decision per request, as enforce.Policy.CheckRequest makes.
		Authorize: func(_ *proxy.Flow, r *authz.Request) proxy.Decision {
			if r.Method == http.MethodGet || r.Method == http.MethodPost && r.Path == "/bench" {
				return proxy.Decision{Allow: true, Reason: "GET, and POST to /bench, allowed"}
			}
			return proxy.Decision{Reason: "only GET, and POST to /bench"}
		},
		NetHTTPOnly: o.netHTTPOnly,
	}
	if metrics {
		m, err := admin.NewMetrics(prometheus.NewRegistry(), nil)
		if err != nil {
			tb.Fatal(err)
		}
		cfg.Observer = telemetry.New(telemetry.Config{Metrics: m, State: st.Snapshot})
	}
	layer, err := mesh.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	cl := &claimingLayer{Layer: layer}
	if o.app == nil {
		o.app = httpApp
	}
	f := newFixture(tb, fixtureOpts{l7: cl, app: o.app})
	cl.claim = func(port uint16) bool { return port == f.b1.app.Port() || port == f.b2.app.Port() }
	tr := &http.Transport{
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			return f.dial(svcL7VIP), nil
		},
		MaxIdleConnsPerHost: 64,
		DisableCompression:  true,
	}
	tb.Cleanup(tr.CloseIdleConnections)
	return f, &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

func l7Get(tb testing.TB, c *http.Client) {
	tb.Helper()
	if err := l7Request(c); err != nil {
		tb.Fatal(err)
	}
}

// l7Request sends one GET through c and checks the answer.
func l7Request(c *http.Client) error {
	resp, err := c.Get("http://b.default.svc.cluster.local/api/items?id=7")
	if err != nil {
		return err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || string(body) != "ok" {
		return fmt.Errorf("status %d, body %q, error %v", resp.StatusCode, body, err)
	}
	return nil
}

// l7Post1k sends one POST with a 1 kB body through c, as the benchmark's
// HTTP workloads do (bench/load: POST /bench, 1 kB each way), and checks
// the 1 kB answer.
func l7Post1k(c *http.Client, body []byte) error {
	resp, err := c.Post("http://b.default.svc.cluster.local/bench", "application/octet-stream", bytes.NewReader(body))
	if err != nil {
		return err
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || n != 1024 {
		return fmt.Errorf("status %d, %d body bytes, error %v", resp.StatusCode, n, err)
	}
	return nil
}

// The tunnels the requests took are listed while open and reported as
// closed cleanly, with their bytes, once the client is gone.
func TestL7Path(t *testing.T) {
	for _, netHTTPOnly := range []bool{false, true} {
		t.Run(fmt.Sprintf("netHTTPOnly=%v", netHTTPOnly), func(t *testing.T) { testL7Path(t, netHTTPOnly) })
	}
}

func testL7Path(t *testing.T, netHTTPOnly bool) {
	f, c := newL7Fixture(t, l7Opts{metrics: true, netHTTPOnly: netHTTPOnly})
	for range 20 {
		l7Get(t, c)
	}
	// One tunnel per endpoint the balancer picked (the Service has two);
	// the source node also lists the client's connection.
	n1, n2 := len(f.node1.Connections()), len(f.node2.Connections())
	if n2 < 1 || n2 > 2 || n1 != n2+1 {
		t.Errorf("%d connections listed on the source node and %d tunnels on the destination, want 1 or 2 tunnels and the client's connection", n1, n2)
	}
	c.Transport.(*http.Transport).CloseIdleConnections()
	waitfor.True(t, 20*time.Second, "the tunnels to be untracked", func() bool {
		return len(f.node1.Connections())+len(f.node2.Connections()) == 0
	})
	for i, obs := range []*recorder{f.obs1, f.obs2} {
		_, closed, refused, bytes := obs.snapshot()
		if len(closed) != n2 || len(refused) != 0 {
			t.Errorf("node %d: closed %v, refused %v; want %d closed", i+1, closed, refused, n2)
		}
		for j := range closed {
			if closed[j] != proxy.CloseEOF || bytes[j] == 0 {
				t.Errorf("node %d: a tunnel closed with %q after %d bytes, want a clean close with bytes", i+1, closed[j], bytes[j])
			}
		}
	}
}

// BenchmarkL7Parallel is BenchmarkL7/metrics (and metrics-nethttp) from
// 16 goroutines, each with its own keep-alive connection, as the
// benchmark's headline workload (http-1000rps-16c) has 16: many streams on
// the agents' shared HBONE connections at once.
func BenchmarkL7Parallel(b *testing.B) {
	for _, v := range []struct {
		name        string
		netHTTPOnly bool
	}{{"metrics", false}, {"metrics-nethttp", true}} {
		b.Run(v.name, func(b *testing.B) {
			_, c := newL7Fixture(b, l7Opts{metrics: true, netHTTPOnly: v.netHTTPOnly})
			l7Get(b, c)
			b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0)))
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := l7Request(c); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
		})
	}
}

// BenchmarkL7 is one HTTP/1.1 GET per op on a keep-alive connection,
// through the whole in-process L7 path: client -> source agent (net/http
// server, routing, balancer, http.Transport) -> HBONE tunnel (mTLS 1.3,
// HTTP/2) -> destination agent (net/http server, L7 authorization,
// reverse proxy) -> the application. cpu-us/op is the CPU time of the
// whole process (client, both agents, application) per request.
// metrics-post1k is the benchmark's own exchange (bench/load): a POST with
// a 1 kB body, answered with 1 kB.
func BenchmarkL7(b *testing.B) {
	for _, v := range []struct {
		name        string
		metrics     bool
		netHTTPOnly bool
		post1k      bool
	}{{"metrics", true, false, false}, {"nometrics", false, false, false}, {"metrics-nethttp", true, true, false},
		{"metrics-post1k", true, false, true}} {
		b.Run(v.name, func(b *testing.B) {
			o := l7Opts{metrics: v.metrics, netHTTPOnly: v.netHTTPOnly}
			if v.post1k {
				o.app = httpApp1k
			}
			_, c := newL7Fixture(b, o)
			if v.post1k {
				body := bytes.Repeat([]byte("y"), 1024)
				do := func() {
					if err := l7Post1k(c, body); err != nil {
						b.Fatal(err)
					}
				}
				do()
				b.ReportAllocs()
				b.ResetTimer()
				cpu0 := cpuTime()
				for b.Loop() {
					do()
				}
				b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
				return
			}
			l7Get(b, c) // connections and tunnel set up
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime()
			for b.Loop() {
				l7Get(b, c)
			}
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
		})
	}
}
