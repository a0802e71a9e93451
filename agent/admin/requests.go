package admin

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// RequestLabelNames are the labels of Istio's request metrics
// (istio_requests_total, istio_request_duration_milliseconds,
// istio_request_bytes, istio_response_bytes): the connection labels with
// request_protocol http or grpc, plus response_code and
// grpc_response_status.
var RequestLabelNames = append(append([]string(nil), ConnLabelNames...), "response_code", "grpc_response_status")

// Istio's buckets: request duration in milliseconds, sizes in bytes.
var (
	durationBuckets = []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}
	sizeBuckets     = []float64{1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000}
)

// Request is one HTTP request as the request metrics and the access log
// see it: the connection's labels (Conn, with the request's destination)
// and the request's outcome.
type Request struct {
	// Conn is held by value, so that a caller can build a Request on its
	// stack: one per request, not one allocation per request.
	Conn Conn
	// Protocol is "http" or "grpc".
	Protocol string
	Method   string
	Path     string
	// Status is the HTTP status (0 when none was sent); GRPCStatus the
	// grpc-status of a gRPC response ("" when unknown).
	Status     int
	GRPCStatus string
	// Flags are Envoy's response flags ("-" when none): RBAC (denied by
	// policy), RL (rate limited), FI (fault abort), UT (timeout), UF
	// (upstream connection failure), NR (no route).
	Flags                       string
	Duration                    time.Duration
	RequestBytes, ResponseBytes int64
}

type requestMetrics struct {
	total                       *prometheus.CounterVec
	duration, reqSize, respSize *prometheus.HistogramVec

	// series caches each label set's four series: a request looks them up
	// by its label values (a comparable array, no allocation) instead of
	// building a label map and hashing it in each vector. Request series
	// are never deleted, so the cache holds what the vectors hold.
	mu     sync.RWMutex
	series map[requestKey]*requestSeries
}

// requestKey is one request's label values, in RequestLabelNames' order
// (25 of them; TestRequestSeriesLabels checks that).
type requestKey [25]string

type requestSeries struct {
	total                       prometheus.Counter
	duration, reqSize, respSize prometheus.Observer
}

// key returns r's label values in RequestLabelNames' order (the order of
// Conn.labels' names in ConnLabelNames, then response_code and
// grpc_response_status; TestRequestSeriesLabels checks it). The canonical
// service and revision appear twice per side: once as
// *_canonical_service/*_canonical_revision and once as *_app/*_version,
// Istio's older label names for the same values, which its dashboards
// still read.
func (r *Request) key() requestKey {
	c := &r.Conn
	return requestKey{
		orUnknown(c.Reporter),
		orUnknown(c.Source.Workload),
		orUnknown(c.Source.CanonicalService),
		orUnknown(c.Source.CanonicalRevision),
		orUnknown(c.Source.Namespace),
		orUnknown(c.Source.Principal),
		orUnknown(c.Source.CanonicalService),
		orUnknown(c.Source.CanonicalRevision),
		orUnknown(c.Source.Cluster),
		orUnknown(c.DstService),
		orUnknown(c.DstServiceNamespace),
		orUnknown(c.DstServiceName),
		orUnknown(c.Destination.Workload),
		orUnknown(c.Destination.CanonicalService),
		orUnknown(c.Destination.CanonicalRevision),
		orUnknown(c.Destination.Namespace),
		orUnknown(c.Destination.Principal),
		orUnknown(c.Destination.CanonicalService),
		orUnknown(c.Destination.CanonicalRevision),
		orUnknown(c.Destination.Cluster),
		r.Protocol,
		orFlags(r.Flags),
		orUnknown(c.SecurityPolicy),
		statusLabel(r.Status),
		r.GRPCStatus,
	}
}

// statusLabel is strconv.Itoa without an allocation for the usual codes.
func statusLabel(code int) string {
	if code >= 0 && code < len(statusLabels) {
		return statusLabels[code]
	}
	return strconv.Itoa(code)
}

var statusLabels = func() []string {
	s := make([]string, 600)
	for i := range s {
		s[i] = strconv.Itoa(i)
	}
	return s
}()

// seriesFor returns the series of k, creating them on first use.
func (r *requestMetrics) seriesFor(k *requestKey) *requestSeries {
	r.mu.RLock()
	s := r.series[*k]
	r.mu.RUnlock()
	if s != nil {
		return s
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if s := r.series[*k]; s != nil {
		return s
	}
	s = &requestSeries{
		total:    r.total.WithLabelValues(k[:]...),
		duration: r.duration.WithLabelValues(k[:]...),
		reqSize:  r.reqSize.WithLabelValues(k[:]...),
		respSize: r.respSize.WithLabelValues(k[:]...),
	}
	if r.series == nil {
		r.series = make(map[requestKey]*requestSeries)
	}
	r.series[*k] = s
	return s
}

func newRequestMetrics() *requestMetrics {
	return &requestMetrics{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total",
			Help: "HTTP and gRPC requests to Services opted in to L7, by both reporters."}, RequestLabelNames),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_duration_milliseconds",
			Help: "Request duration in milliseconds, from the request's headers to the response's end.", Buckets: durationBuckets}, RequestLabelNames),
		reqSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_bytes",
			Help: "Request body size in bytes.", Buckets: sizeBuckets}, RequestLabelNames),
		respSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_response_bytes",
			Help: "Response body size in bytes.", Buckets: sizeBuckets}, RequestLabelNames),
	}
}

func (r *requestMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{r.total, r.duration, r.reqSize, r.respSize}
}

// Request counts one request in Istio's request metrics and access-logs it.
func (m *Metrics) Request(r *Request) {
	k := r.key()
	s := m.requests.seriesFor(&k)
	s.total.Inc()
	s.duration.Observe(float64(r.Duration.Microseconds()) / 1000)
	s.reqSize.Observe(float64(r.RequestBytes))
	s.respSize.Observe(float64(r.ResponseBytes))
	if m.access != nil {
		c := &r.Conn
		m.access.LogAttrs(context.Background(), slog.LevelInfo, "request",
			slog.String("reporter", c.Reporter),
			slog.String("src", c.Src.String()),
			slog.String("dst", c.Dst.String()),
			slog.String("src_workload", c.Source.Workload),
			slog.String("src_namespace", c.Source.Namespace),
			slog.String("src_spiffe_id", c.Source.Principal),
			slog.String("dst_workload", c.Destination.Workload),
			slog.String("dst_namespace", c.Destination.Namespace),
			slog.String("dst_spiffe_id", c.Destination.Principal),
			slog.String("dst_service", c.DstService),
			slog.String("protocol", r.Protocol),
			slog.String("method", r.Method),
			slog.String("path", r.Path),
			slog.Int("status", r.Status),
			slog.String("grpc_status", r.GRPCStatus),
			slog.String("response_flags", orFlags(r.Flags)),
			slog.Int64("request_bytes", r.RequestBytes),
			slog.Int64("response_bytes", r.ResponseBytes),
			slog.Float64("duration_ms", float64(r.Duration.Microseconds())/1000),
		)
	}
}
