package exposure

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestLedgerCountsWindowAndDryRun(t *testing.T) {
	reg := prometheus.NewRegistry()
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	clock := now
	l, err := New(Config{Node: "node-1", Window: 30 * time.Minute, Bucket: time.Minute, MaxPairs: 3, Registerer: reg, Now: func() time.Time { return clock }})
	if err != nil {
		t.Fatal(err)
	}
	// 20 minutes ago: one outbound plaintext connection.
	clock = now.Add(-20 * time.Minute)
	l.Record(Event{Direction: Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "shop/web-3", DstNamespace: "shop", DstEnrolled: true, Bytes: 100})
	clock = now
	for range 3 {
		l.Record(Event{Direction: Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "shop/web-3", DstNamespace: "shop", DstEnrolled: true, Bytes: 10})
	}
	l.Record(Event{Direction: Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "10.9.9.9", Bytes: 5})
	l.Record(Event{Direction: Inbound, Src: "outside/o3", Dst: "shop/web-2", DstNamespace: "shop", DstEnrolled: true, Bytes: 7})
	l.Record(Event{Direction: "sideways", Src: "x", Dst: "y"}) // ignored

	r, err := l.Report(ReportOptions{Window: 10 * time.Minute, IfStrict: "shop"})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Total[Outbound]; got != (Totals{4, 35}) {
		t.Errorf("outbound total %+v, want 4 conns 35 bytes", got)
	}
	if got := r.ByNamespace[Inbound]["shop"]; got != (Totals{1, 7}) {
		t.Errorf("inbound shop %+v", got)
	}
	if r.IfStrict == nil || r.IfStrict.Connections != 4 || r.IfStrict.Bytes != 37 || len(r.IfStrict.Pairs) != 2 {
		t.Errorf("dry run %+v, want the 3 to web-3 and the 1 to web-2", r.IfStrict)
	}
	if len(r.Top) != 3 || r.Top[0].Dst != "shop/web-3" || r.Top[0].Connections != 3 {
		t.Errorf("top %+v", r.Top)
	}
	// The whole window includes the old connection.
	r, _ = l.Report(ReportOptions{})
	if got := r.Total[Outbound]; got != (Totals{5, 135}) {
		t.Errorf("30m outbound total %+v", got)
	}
	// Counters are not windowed.
	if v := testutil.ToFloat64(l.conns.WithLabelValues(Outbound, "client", "node-1")); v != 5 {
		t.Errorf("outbound counter %v", v)
	}
	if v := testutil.ToFloat64(l.bytes.WithLabelValues(Inbound, "shop", "node-1")); v != 7 {
		t.Errorf("inbound bytes counter %v", v)
	}
	// Past the window, old buckets drop out.
	clock = now.Add(31 * time.Minute)
	r, _ = l.Report(ReportOptions{})
	if len(r.Total) != 0 || len(r.Top) != 0 {
		t.Errorf("after the window: %+v", r)
	}
	if _, err := l.Report(ReportOptions{Window: time.Hour}); err == nil {
		t.Error("a window longer than kept: want an error")
	}
}

func TestLedgerBoundsPairs(t *testing.T) {
	l, err := New(Config{MaxPairs: 2})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		l.Record(Event{Direction: Outbound, Src: "a/x", SrcNamespace: "a", Dst: strings.Repeat("d", i+1), Bytes: 1})
	}
	r, _ := l.Report(ReportOptions{Top: 100})
	if len(r.Top) != 3 || r.Total[Outbound].Connections != 50 {
		t.Fatalf("pairs %+v total %+v: want 2 pairs + overflow holding the rest", r.Top, r.Total)
	}
	var other bool
	for _, p := range r.Top {
		other = other || (p.Src == overflow && p.Connections == 48)
	}
	if !other {
		t.Errorf("no overflow pair with 48 connections: %+v", r.Top)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, c := range []Config{{Window: time.Second, Bucket: time.Minute}, {Window: 1000 * time.Hour, Bucket: time.Second}, {Bucket: -1}} {
		if _, err := New(c); err == nil {
			t.Errorf("%+v: want an error", c)
		}
	}
}

func TestHandler(t *testing.T) {
	l, _ := New(Config{Node: "n"})
	l.Record(Event{Direction: Inbound, Src: "10.0.0.9", Dst: "shop/web-2", DstNamespace: "shop", DstEnrolled: true, Bytes: 3})
	h := Handler(l)
	for q, code := range map[string]int{"": 200, "?window=10m&if-strict=shop": 200, "?window=x": 400, "?window=100h": 400, "?top=0": 400} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", Path+q, nil))
		if w.Code != code {
			t.Errorf("%s: %d %s, want %d", q, w.Code, w.Body, code)
		}
		if code == 200 && strings.Contains(q, "if-strict") {
			var r Report
			if err := json.Unmarshal(w.Body.Bytes(), &r); err != nil || r.IfStrict == nil || r.IfStrict.Connections != 1 {
				t.Errorf("dry run over HTTP: %v %+v", err, r.IfStrict)
			}
		}
	}
}
