package dataplane_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
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
	a, b := f.pod("a", "127.0.0.11"), f.pod("b", "127.0.0.12")
	f.apply(a, b)
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	f.waitStatus("mesh/b", telemetry.CaptureVerified)
	app := doublingServer(t, "127.0.0.12")
	tunnel := f.capture.Pod("mesh/b").HBONE.Addr().(*net.TCPAddr).AddrPort().Port()
	viaB := proxy.ResolverFunc(func(_ *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
		return proxy.Destination{Endpoints: []proxy.Endpoint{{Addr: dst, Workload: "mesh/b", Enrolled: true, Identity: b.Identity, TunnelPort: tunnel}}}, nil
	})
	f.resolve.Store(&viaB)
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
		f.resolve.Store(&viaB)
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
	target := labels.FromStrings("job", "nodemesh-agent", "node", "node-1", "instance", "10.0.0.1:15020", "pod", "nodemesh-agent-x", "namespace", "nodemesh-system")
	db := sampleDB{}
	db.add(first, 0, target)
	db.add(second, 60_000, target)

	raw, err := os.ReadFile("../../manifests/observability/nodemesh-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	exprs := dashboardExprs(t, raw)
	vars := strings.NewReplacer("$__rate_interval", "2m", "$__interval", "1m", "$node", ".*")
	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 1_000_000, Timeout: 10 * time.Second, LookbackDelta: 5 * time.Minute})
	at := time.UnixMilli(60_000)
	checked := 0
	for _, e := range exprs {
		expr := vars.Replace(e)
		q, err := engine.NewInstantQuery(context.Background(), db, nil, expr, at)
		if err != nil {
			t.Errorf("%q: %v", expr, err)
			continue
		}
		res := q.Exec(context.Background())
		q.Close()
		if res.Err != nil {
			t.Errorf("%q: %v", expr, res.Err)
			continue
		}
		if !db.hasAll(t, expr) {
			continue // metrics of the full agent (capture, SVIDs, build): not in this data plane
		}
		checked++
		if empty(res.Value) {
			t.Errorf("%q returns nothing on the scrapes", expr)
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
		q, err := engine.NewInstantQuery(context.Background(), db, nil, `sum(`+metric+`{job="nodemesh-agent", reporter="source"})`, at)
		if err != nil {
			t.Fatal(err)
		}
		res := q.Exec(context.Background())
		if res.Err != nil || empty(res.Value) {
			t.Fatalf("%s: %v %v", metric, res.Value, res.Err)
		}
		if v := res.Value.(promql.Vector)[0].F; v != want {
			t.Errorf("%s %v, want %v", metric, v, want)
		}
		q.Close()
	}
}

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

// dashboardExprs returns the queries of a Grafana dashboard's panels.
func dashboardExprs(t *testing.T, raw []byte) []string {
	t.Helper()
	var dash struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatal(err)
	}
	var out []string
	var walk func([]json.RawMessage)
	walk = func(ps []json.RawMessage) {
		for _, p := range ps {
			var panel struct {
				Targets []struct {
					Expr string `json:"expr"`
				} `json:"targets"`
				Panels []json.RawMessage `json:"panels"`
			}
			if err := json.Unmarshal(p, &panel); err != nil {
				t.Fatal(err)
			}
			for _, tg := range panel.Targets {
				if tg.Expr != "" {
					out = append(out, tg.Expr)
				}
			}
			walk(panel.Panels)
		}
	}
	walk(dash.Panels)
	if len(out) < 10 {
		t.Fatalf("only %d dashboard queries", len(out))
	}
	return out
}

func empty(v parser.Value) bool {
	switch v := v.(type) {
	case promql.Vector:
		return len(v) == 0
	case promql.Matrix:
		return len(v) == 0
	}
	return false // a scalar or a string always has a value
}

// sampleDB is an in-memory storage.Queryable: float samples per series.
type sampleDB map[string]*dbSeries

type dbSeries struct {
	lset    labels.Labels
	samples []chunks.Sample
}

type fsample struct {
	t int64
	f float64
}

func (s fsample) T() int64                      { return s.t }
func (s fsample) F() float64                    { return s.f }
func (s fsample) H() *histogram.Histogram       { return nil }
func (s fsample) FH() *histogram.FloatHistogram { return nil }
func (s fsample) Type() chunkenc.ValueType      { return chunkenc.ValFloat }
func (s fsample) Copy() chunks.Sample           { return s }

func (db sampleDB) put(name string, lset []*dto.LabelPair, extra labels.Labels, ts int64, v float64, more ...string) {
	b := labels.NewBuilder(extra)
	b.Set(model.MetricNameLabel, name)
	for _, l := range lset {
		b.Set(l.GetName(), l.GetValue())
	}
	for i := 0; i+1 < len(more); i += 2 {
		b.Set(more[i], more[i+1])
	}
	ls := b.Labels()
	s, ok := db[ls.String()]
	if !ok {
		s = &dbSeries{lset: ls}
		db[ls.String()] = s
	}
	s.samples = append(s.samples, fsample{ts, v})
}

// add stores a scrape taken at ts, as Prometheus would: histograms as
// _bucket, _sum and _count series.
func (db sampleDB) add(mfs []*dto.MetricFamily, ts int64, target labels.Labels) {
	for _, mf := range mfs {
		name := mf.GetName()
		for _, m := range mf.GetMetric() {
			switch {
			case m.Counter != nil:
				db.put(name, m.GetLabel(), target, ts, m.GetCounter().GetValue())
			case m.Gauge != nil:
				db.put(name, m.GetLabel(), target, ts, m.GetGauge().GetValue())
			case m.Untyped != nil:
				db.put(name, m.GetLabel(), target, ts, m.GetUntyped().GetValue())
			case m.Histogram != nil:
				h := m.GetHistogram()
				for _, bk := range h.GetBucket() {
					db.put(name+"_bucket", m.GetLabel(), target, ts, float64(bk.GetCumulativeCount()), "le", fmt.Sprint(bk.GetUpperBound()))
				}
				db.put(name+"_bucket", m.GetLabel(), target, ts, float64(h.GetSampleCount()), "le", "+Inf")
				db.put(name+"_sum", m.GetLabel(), target, ts, h.GetSampleSum())
				db.put(name+"_count", m.GetLabel(), target, ts, float64(h.GetSampleCount()))
			case m.Summary != nil:
				db.put(name+"_sum", m.GetLabel(), target, ts, m.GetSummary().GetSampleSum())
				db.put(name+"_count", m.GetLabel(), target, ts, float64(m.GetSummary().GetSampleCount()))
			}
		}
	}
}

// hasAll reports whether every metric expr selects has a series.
func (db sampleDB) hasAll(t *testing.T, expr string) bool {
	e, err := parser.ParseExpr(expr)
	if err != nil {
		t.Fatal(err)
	}
	ok := true
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, is := n.(*parser.VectorSelector); is {
			found := false
			for _, s := range db {
				if s.lset.Get(model.MetricNameLabel) == vs.Name {
					found = true
					break
				}
			}
			ok = ok && found
		}
		return nil
	})
	return ok
}

func (db sampleDB) Querier(mint, maxt int64) (storage.Querier, error) {
	return &storage.MockQuerier{SelectMockFunction: func(_ bool, _ *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
		var out []storage.Series
		for _, s := range db {
			if matchAll(s.lset, ms) {
				out = append(out, storage.NewListSeries(s.lset, s.samples))
			}
		}
		slices.SortFunc(out, func(a, b storage.Series) int { return labels.Compare(a.Labels(), b.Labels()) })
		return &listSet{series: out, i: -1}
	}}, nil
}

func matchAll(ls labels.Labels, ms []*labels.Matcher) bool {
	for _, m := range ms {
		if !m.Matches(ls.Get(m.Name)) {
			return false
		}
	}
	return true
}

type listSet struct {
	series []storage.Series
	i      int
}

func (l *listSet) Next() bool                        { l.i++; return l.i < len(l.series) }
func (l *listSet) At() storage.Series                { return l.series[l.i] }
func (l *listSet) Err() error                        { return nil }
func (l *listSet) Warnings() annotations.Annotations { return nil }
