// Package tracing is the L7 path's distributed tracing: it continues the
// W3C trace context (traceparent, tracestate) a client sent, records one
// span per request at each agent (CLIENT at the source agent, SERVER at the
// destination agent, as Istio's proxies do), passes the context on to the
// next hop, and exports the spans with OpenTelemetry over OTLP/HTTP.
//
// Sampling is the operator's: a request whose traceparent says sampled is
// recorded (parent-based), and a request that starts a trace is recorded
// with the configured probability. A nil *Tracer traces nothing, so callers
// need no checks.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Config configures a Tracer.
type Config struct {
	// Endpoint is the OTLP/HTTP collector's base URL, e.g.
	// http://otel-collector.observability:4318 (spans go to /v1/traces).
	Endpoint string
	// Sampling is the probability, 0 to 1, that a request starting a new
	// trace is recorded. Requests that arrive with a sampled traceparent
	// are always recorded.
	Sampling float64
	// Node names the agent's node in the spans' resource.
	Node string
	// Exporter replaces the OTLP exporter (tests); Endpoint is then unused.
	Exporter sdktrace.SpanExporter
}

// Tracer records and exports spans. Its zero value is not usable; a nil
// *Tracer is (it traces nothing).
type Tracer struct {
	tp   *sdktrace.TracerProvider
	tr   trace.Tracer
	prop propagation.TextMapPropagator
}

// New checks cfg and starts the exporter. Shutdown flushes and stops it.
func New(ctx context.Context, cfg Config) (*Tracer, error) {
	if cfg.Sampling < 0 || cfg.Sampling > 1 {
		return nil, fmt.Errorf("trace sampling %v: want a probability from 0 to 1", cfg.Sampling)
	}
	exp := cfg.Exporter
	if exp == nil {
		if cfg.Endpoint == "" {
			return nil, errors.New("tracing needs an OTLP endpoint")
		}
		var err error
		exp, err = otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(cfg.Endpoint+"/v1/traces"))
		if err != nil {
			return nil, fmt.Errorf("creating the OTLP/HTTP span exporter for %s: %w", cfg.Endpoint, err)
		}
	}
	res := resource.NewSchemaless(
		attribute.String("service.name", "nodemesh-agent"),
		attribute.String("k8s.node.name", cfg.Node),
	)
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.Sampling))),
	)
	return &Tracer{tp: tp, tr: tp.Tracer("github.com/nodemesh/nodemesh/agent/l7"), prop: propagation.TraceContext{}}, nil
}

// Shutdown exports the spans still buffered and stops the exporter.
func (t *Tracer) Shutdown(ctx context.Context) error {
	if t == nil {
		return nil
	}
	return t.tp.Shutdown(ctx)
}

// Span is one request's span; End it once. A nil *Span does nothing.
type Span struct{ s trace.Span }

// Start continues the trace context of r's headers (a new trace when
// there is none or it is invalid), starts a span of kind for the request,
// and writes the span's context into r's headers, so that the request
// forwarded to the next hop carries it. name is the span name, e.g.
// "web.shop.svc.cluster.local:80/*".
func (t *Tracer) Start(r *http.Request, kind trace.SpanKind, name string, attrs ...attribute.KeyValue) (*http.Request, *Span) {
	if t == nil {
		return r, nil
	}
	ctx := t.prop.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	ctx, s := t.tr.Start(ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(
		attribute.String("http.request.method", r.Method),
		attribute.String("url.path", r.URL.Path),
		attribute.String("server.address", r.Host),
		attribute.String("network.protocol.version", strconv.Itoa(r.ProtoMajor)+"."+strconv.Itoa(r.ProtoMinor)),
	), trace.WithAttributes(attrs...))
	// The next hop sees this span as its parent. A client-sent
	// tracestate is kept; baggage is not propagated or read.
	r.Header.Del("Traceparent")
	r.Header.Del("Tracestate")
	t.prop.Inject(ctx, propagation.HeaderCarrier(r.Header))
	return r.WithContext(ctx), &Span{s: s}
}

// End records the response status and Envoy response flags ("-": none)
// and ends the span.
func (s *Span) End(status int, flags string, attrs ...attribute.KeyValue) {
	if s == nil {
		return
	}
	s.s.SetAttributes(attribute.Int("http.response.status_code", status), attribute.String("response_flags", flags))
	s.s.SetAttributes(attrs...)
	if status >= 500 || status == 0 {
		s.s.SetStatus(codes.Error, "")
	}
	s.s.End()
}
