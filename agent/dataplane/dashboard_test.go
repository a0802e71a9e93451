package dataplane_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
	"github.com/nodemesh/nodemesh/agent/telemetry/dashtest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// TestDashboardQueriesOnScrape runs every query of the Grafana dashboard
// nodemesh ships against two scrapes of a data plane's metrics taken a
// minute apart (in sample time) around real connections: one held open
// over HBONE, one refused (no endpoints), one whose dial fails. Each query
// must evaluate, and each query whose metrics the scrape has must return
// data: a query that parses and names exported metrics can still select
// nothing (a wrong label value, a direction mixed up).
func TestDashboardQueriesOnScrape(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := admin.NewMetrics(reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, telemetry.New(telemetry.Config{Metrics: m, State: st.Snapshot}))
	f.tunneledPair()
	viaB := f.resolve.Load()
	app := doublingServer(t, "127.0.0.12")
	pa := f.capture.Pod("mesh/a")
	pa.SetDst(app)
	c, err := net.Dial("tcp", pa.Outbound.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	exchange := func(n int) {
		t.Helper()
		if _, err := c.Write(make([]byte, n)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 2*n)); err != nil {
			t.Fatal(err)
		}
	}
	// A refused connection (no endpoints) and a failed one (nothing
	// listens), before each scrape, so that their series have two samples
	// as rate() needs.
	none := proxy.ResolverFunc(func(*proxy.Workload, netip.AddrPort) (proxy.Destination, error) {
		return proxy.Destination{}, fmt.Errorf("test: %w", proxy.ErrNoEndpoints)
	})
	passthrough := proxy.ResolverFunc(func(_ *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
		return proxy.Destination{Endpoints: []proxy.Endpoint{{Addr: dst}}}, nil
	})
	closed := closedPort(t)
	refuseAndFail := func() {
		t.Helper()
		f.resolve.Store(&none)
		if err := f.roundTripTo("mesh/a", app); err == nil {
			t.Fatal("a connection without endpoints went through")
		}
		f.resolve.Store(&passthrough)
		if err := f.roundTripTo("mesh/a", closed); err == nil {
			t.Fatal("a connection to a closed port went through")
		}
		f.resolve.Store(viaB)
	}
	exchange(100)
	refuseAndFail()
	waitfor.True(t, 20*time.Second, "the first bytes and refusals", func() bool {
		return series(t, reg, "istio_tcp_received_bytes_total")["destination"] == 100 &&
			series(t, reg, "istio_tcp_connections_closed_total")["source"] == 2
	})
	first := gather(t, reg)

	exchange(4000)
	refuseAndFail()
	waitfor.True(t, 20*time.Second, "the second bytes and refusals", func() bool {
		return series(t, reg, "istio_tcp_received_bytes_total")["destination"] == 4100 &&
			series(t, reg, "istio_tcp_connections_closed_total")["source"] == 4
	})
	second := gather(t, reg)

	// Two scrapes, 60 s apart in sample time, with the labels the
	// PodMonitor adds.
	db := dashtest.DB{}
	db.Add(first, 0, dashtest.Target)
	db.Add(second, 60_000, dashtest.Target)
	raw, err := os.ReadFile("../../manifests/observability/nodemesh-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	exprs, err := dashtest.Exprs(raw)
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, r := range dashtest.Run(db, exprs, 60_000) {
		switch {
		case r.Err != nil:
			t.Errorf("%q: %v", r.Expr, r.Err)
		case r.Checked:
			checked++
			if r.Empty {
				t.Errorf("%q returns nothing on the scrapes", r.Expr)
			}
		}
	}
	t.Logf("%d of %d dashboard queries checked for data (the others need the capture, SVID or build collectors)", checked, len(exprs))
	if checked < 8 {
		t.Errorf("only %d dashboard queries could be checked for data", checked)
	}
	// The throughput panel's series, in Istio's directions: request bytes
	// (received) and response bytes (sent, twice as many here) at the
	// source, while the connection is still open.
	for metric, want := range map[string]float64{"istio_tcp_received_bytes_total": 4100, "istio_tcp_sent_bytes_total": 8200} {
		if v, err := dashtest.Sum(db, metric+`{job="nodemesh-agent", reporter="source"}`, 60_000); err != nil || v != want {
			t.Errorf("%s: %v %v, want %v", metric, v, err, want)
		}
	}
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

func gather(t *testing.T, reg *prometheus.Registry) []*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}
