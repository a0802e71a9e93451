package tracing

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

func newTracer(t *testing.T, sampling float64) (*Tracer, *tracetest.InMemoryExporter) {
	t.Helper()
	exp := tracetest.NewInMemoryExporter()
	tr, err := New(context.Background(), Config{Exporter: exp, Sampling: sampling, Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tr.Shutdown(context.Background()) })
	return tr, exp
}

// Two hops, as the source and destination agents: the client's trace is
// continued, the destination's span is the child of the source's, and the
// application receives the destination span as its parent.
func TestContinuesTheClientsTrace(t *testing.T) {
	src, srcExp := newTracer(t, 0) // sampling 0: only a sampled parent records
	dst, dstExp := newTracer(t, 0)
	const clientTrace, clientSpan = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	r := httptest.NewRequest(http.MethodGet, "http://web.shop/api?x=1", nil)
	r.Header.Set("Traceparent", "00-"+clientTrace+"-"+clientSpan+"-01")
	r.Header.Set("Tracestate", "vendor=1")
	r, s1 := src.Start(r, trace.SpanKindClient, "web.shop.svc:80/*")
	hop := r.Header.Clone()
	r2 := httptest.NewRequest(http.MethodGet, "http://web.shop/api?x=1", nil)
	r2.Header = hop
	r2, s2 := dst.Start(r2, trace.SpanKindServer, "inbound|8080|shop/web-1")
	app := r2.Header.Get("Traceparent")
	s2.End(403, "RBAC")
	s1.End(403, "-")
	if err := src.tp.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := dst.tp.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	a, b := srcExp.GetSpans(), dstExp.GetSpans()
	if len(a) != 1 || len(b) != 1 {
		t.Fatalf("spans: source %d, destination %d; want 1 each", len(a), len(b))
	}
	c, s := a[0], b[0]
	if c.SpanContext.TraceID().String() != clientTrace || s.SpanContext.TraceID().String() != clientTrace {
		t.Errorf("trace IDs %s and %s, want the client's %s", c.SpanContext.TraceID(), s.SpanContext.TraceID(), clientTrace)
	}
	if c.Parent.SpanID().String() != clientSpan || c.SpanKind != trace.SpanKindClient {
		t.Errorf("source span: parent %s kind %v, want the client's span and CLIENT", c.Parent.SpanID(), c.SpanKind)
	}
	if s.Parent.SpanID() != c.SpanContext.SpanID() || s.SpanKind != trace.SpanKindServer {
		t.Errorf("destination span: parent %s kind %v, want the source span %s and SERVER", s.Parent.SpanID(), s.SpanKind, c.SpanContext.SpanID())
	}
	if want := "00-" + clientTrace + "-" + s.SpanContext.SpanID().String() + "-01"; app != want {
		t.Errorf("the application's traceparent %q, want %q", app, want)
	}
	if got := hop.Get("Tracestate"); got != "vendor=1" {
		t.Errorf("tracestate %q not kept", got)
	}
	attrs := map[string]string{}
	for _, kv := range s.Attributes {
		attrs[string(kv.Key)] = kv.Value.Emit()
	}
	if attrs["http.response.status_code"] != "403" || attrs["response_flags"] != "RBAC" || attrs["url.path"] != "/api" || attrs["http.request.method"] != "GET" {
		t.Errorf("destination span attributes %v", attrs)
	}
	if got := s.Resource.String(); !strings.Contains(got, "k8s.node.name=node-1") || !strings.Contains(got, "service.name=nodemesh-agent") {
		t.Errorf("resource %s", got)
	}
}

// Sampling: a request that starts a trace is recorded with the configured
// probability (here 0 and 1); an invalid traceparent starts a new trace.
func TestSampling(t *testing.T) {
	for _, tc := range []struct {
		sampling float64
		header   string
		want     int
	}{
		{0, "", 0},
		{1, "", 1},
		{0, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", 0}, // parent not sampled
		{1, "00-00000000000000000000000000000000-00f067aa0ba902b7-01", 1}, // invalid: new trace
	} {
		tr, exp := newTracer(t, tc.sampling)
		r := httptest.NewRequest(http.MethodGet, "http://web/", nil)
		if tc.header != "" {
			r.Header.Set("Traceparent", tc.header)
		}
		r, s := tr.Start(r, trace.SpanKindClient, "x")
		s.End(200, "-")
		_ = tr.tp.ForceFlush(context.Background())
		if n := len(exp.GetSpans()); n != tc.want {
			t.Errorf("sampling %v, traceparent %q: %d spans, want %d", tc.sampling, tc.header, n, tc.want)
		}
		if tp := r.Header.Get("Traceparent"); len(tp) != 55 || strings.Contains(tp, "-00000000000000000000000000000000-") {
			t.Errorf("forwarded traceparent %q is not a valid one", tp)
		}
	}
}

// A nil Tracer changes nothing: the traceparent goes on untouched.
func TestNilTracer(t *testing.T) {
	var tr *Tracer
	r := httptest.NewRequest(http.MethodGet, "http://web/", nil)
	r.Header.Set("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	r2, s := tr.Start(r, trace.SpanKindClient, "x")
	s.End(200, "-")
	if r2 != r || r.Header.Get("Traceparent") != "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" {
		t.Error("a nil tracer changed the request")
	}
	if err := tr.Shutdown(context.Background()); err != nil {
		t.Error(err)
	}
	if _, err := New(context.Background(), Config{Sampling: 2}); err == nil {
		t.Error("sampling 2 accepted")
	}
	if _, err := New(context.Background(), Config{Sampling: 0.5}); err == nil {
		t.Error("no endpoint accepted")
	}
}
