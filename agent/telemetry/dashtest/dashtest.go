// Package dashtest runs the queries of the Grafana dashboard nodemesh ships
// against scrapes of an agent's metrics, with Prometheus's own query
// engine, for tests: an in-process data plane's (agent/dataplane) and a
// real agent's in the lab (cmd/nodemesh-agent). A query that parses and
// names exported metrics can still select nothing (a wrong label value, a
// direction mixed up); this finds those.
package dashtest

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"
)

// Target are the labels the shipped PodMonitor gives an agent's series.
var Target = labels.FromStrings("job", "nodemesh-agent", "node", "node-1", "instance", "10.0.0.1:15020",
	"pod", "nodemesh-agent-x", "namespace", "nodemesh-system", "container", "agent", "endpoint", "metrics")

// DB is an in-memory storage.Queryable of float samples: what Prometheus
// would have stored from a few scrapes.
type DB map[string]*dbSeries

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

func (db DB) put(name string, lset []*dto.LabelPair, target labels.Labels, ts int64, v float64, more ...string) {
	// The PodMonitor sets honorLabels: the series' own labels (the
	// namespace and pod of nodemesh_capture_status) win over the target's.
	b := labels.NewBuilder(target)
	for _, l := range lset {
		b.Set(l.GetName(), l.GetValue())
	}
	b.Set(model.MetricNameLabel, name)
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

// Add stores a scrape taken at ts (Unix milliseconds), as Prometheus
// would: histograms as _bucket, _sum and _count series. Scrapes must be
// added in time order.
func (db DB) Add(mfs []*dto.MetricFamily, ts int64, target labels.Labels) {
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

// AddText stores a scrape in Prometheus's text format.
func (db DB) AddText(text string, ts int64, target labels.Labels) error {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return fmt.Errorf("parsing the scrape: %w", err)
	}
	mfs := make([]*dto.MetricFamily, 0, len(fams))
	for _, mf := range fams {
		mfs = append(mfs, mf)
	}
	db.Add(mfs, ts, target)
	return nil
}

// Has reports whether the scrapes have a series of every metric expr
// selects.
func (db DB) Has(expr parser.Expr) bool {
	ok := true
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
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

// Querier implements storage.Queryable.
func (db DB) Querier(_, _ int64) (storage.Querier, error) {
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

// Exprs returns the queries of a Grafana dashboard's panels (rows'
// nested panels included).
func Exprs(dashboard []byte) ([]string, error) {
	var out []string
	var walk func([]json.RawMessage) error
	walk = func(ps []json.RawMessage) error {
		for _, p := range ps {
			var panel struct {
				Targets []struct {
					Expr string `json:"expr"`
				} `json:"targets"`
				Panels []json.RawMessage `json:"panels"`
			}
			if err := json.Unmarshal(p, &panel); err != nil {
				return err
			}
			for _, tg := range panel.Targets {
				if tg.Expr != "" {
					out = append(out, tg.Expr)
				}
			}
			if err := walk(panel.Panels); err != nil {
				return err
			}
		}
		return nil
	}
	var dash struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(dashboard, &dash); err != nil {
		return nil, fmt.Errorf("reading the dashboard: %w", err)
	}
	if err := walk(dash.Panels); err != nil {
		return nil, fmt.Errorf("reading the dashboard's panels: %w", err)
	}
	return out, nil
}

// Grafana replaces the dashboard's variables: every node, and rate windows
// that span two scrapes a minute apart.
var Grafana = strings.NewReplacer("$__rate_interval", "2m", "$__interval", "1m", "$node", ".*")

// Result is one query's outcome.
type Result struct {
	Expr string // with the variables replaced
	// Err: the query did not parse or evaluate.
	Err error
	// Checked: the scrapes have every metric it selects, so it should
	// return data; Empty: it returned none.
	Checked, Empty bool
	Value          parser.Value
}

// Run evaluates each query at time at (Unix milliseconds) on db.
func Run(db DB, exprs []string, at int64) []Result {
	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 1_000_000, Timeout: 10 * time.Second, LookbackDelta: 5 * time.Minute})
	var out []Result
	for _, e := range exprs {
		r := Result{Expr: Grafana.Replace(e)}
		out = append(out, r)
		res := &out[len(out)-1]
		parsed, err := parser.ParseExpr(res.Expr)
		if err != nil {
			res.Err = err
			continue
		}
		q, err := engine.NewInstantQuery(context.Background(), db, nil, res.Expr, time.UnixMilli(at))
		if err != nil {
			res.Err = err
			continue
		}
		v := q.Exec(context.Background())
		if v.Err != nil {
			res.Err = v.Err
		} else {
			res.Value = v.Value
			res.Checked = db.Has(parsed)
			res.Empty = empty(v.Value)
		}
		q.Close()
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

// Sum evaluates expr at time at and returns its single value (the sum of
// a vector), or an error.
func Sum(db DB, expr string, at int64) (float64, error) {
	rs := Run(db, []string{"sum(" + expr + ")"}, at)
	r := rs[0]
	if r.Err != nil {
		return 0, r.Err
	}
	vec, ok := r.Value.(promql.Vector)
	if !ok || len(vec) != 1 {
		return 0, fmt.Errorf("%s: %v, want one value", r.Expr, r.Value)
	}
	return vec[0].F, nil
}
