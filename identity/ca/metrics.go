package ca

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Names of the CA's limits, the values of the limit label of
// nodemesh_ca_limit_hits_total. docs/security.md lists what each bounds.
const (
	LimitConns           = "conns"                    // open connections, all callers
	LimitConnsPerCaller  = "conns_per_caller"         // open connections from one source address
	LimitRequests        = "requests"                 // requests in progress, all callers
	LimitPerCaller       = "requests_per_caller"      // requests in progress from one source address
	LimitAuthFailures    = "auth_failures_per_caller" // failed authentications per source address and second
	LimitBodySize        = "body_size"                // body over identity.MaxRequestBytes
	LimitBodyTimeout     = "body_timeout"             // body not received within BodyTimeout
	LimitTokenReviews    = "token_reviews"            // concurrent TokenReviews
	LimitInFlight        = "in_flight"                // concurrent authenticated sign decisions
	LimitHTTP2Violations = "http2_protocol"           // HTTP/2 protocol errors and flood protections of net/http
)

// Metrics are the CA's Prometheus metrics. One Metrics is shared by the
// Server and the KubeAuthenticator of one CA.
type Metrics struct {
	requests *prometheus.CounterVec
	limits   *prometheus.CounterVec
	reviews  *prometheus.CounterVec
	cache    *prometheus.CounterVec
	reading  prometheus.Gauge
}

// NewMetrics creates the CA's metrics and registers them with reg (nil:
// not registered, for tests that read them with Limit and friends).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodemesh_ca_sign_requests_total",
			Help: "Sign requests by result: issued, or the refusal code.",
		}, []string{"result"}),
		limits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodemesh_ca_limit_hits_total",
			Help: "Requests and connections refused or cut because a limit was reached, by limit.",
		}, []string{"limit"}),
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodemesh_ca_token_reviews_total",
			Help: "TokenReviews sent to the API server, by result (authenticated, rejected, error).",
		}, []string{"result"}),
		cache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodemesh_ca_token_cache_total",
			Help: "Token authentications answered without a TokenReview, by why: hit (cached success), negative_hit (cached refusal), precheck (not a usable token on its face).",
		}, []string{"result"}),
		reading: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodemesh_ca_requests_reading_body",
			Help: "Sign requests whose body is being read (they hold no in-flight slot yet).",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.limits, m.reviews, m.cache, m.reading)
	}
	return m
}

// LimitHits returns how often limit was hit (for tests and status pages).
func (m *Metrics) LimitHits(limit string) float64 {
	return counterValue(m.limits.WithLabelValues(limit))
}

// Requests returns the number of sign requests with result (issued or a
// refusal code).
func (m *Metrics) Requests(result string) float64 {
	return counterValue(m.requests.WithLabelValues(result))
}

// Reviews returns the number of TokenReviews with result.
func (m *Metrics) Reviews(result string) float64 {
	return counterValue(m.reviews.WithLabelValues(result))
}

// ReadingBody returns the number of requests whose body is being read.
func (m *Metrics) ReadingBody() float64 {
	return gaugeValue(m.reading)
}

// limitLog logs a limit the first time it is hit and then at most once per
// interval, with the number of hits in between, so that an attack shows
// in the log without flooding it.
type limitLog struct {
	log      *slog.Logger
	interval time.Duration

	mu   sync.Mutex
	last map[string]time.Time
	hits map[string]int
}

func newLimitLog(log *slog.Logger, interval time.Duration) *limitLog {
	return &limitLog{log: log, interval: interval, last: map[string]time.Time{}, hits: map[string]int{}}
}

// hit records one hit of limit and logs it if due. The map keys are the
// fixed limit names, so the maps stay small.
func (l *limitLog) hit(ctx context.Context, limit, remote, detail string) {
	l.mu.Lock()
	now := time.Now()
	l.hits[limit]++
	last, seen := l.last[limit]
	if seen && now.Sub(last) < l.interval {
		l.mu.Unlock()
		return
	}
	n := l.hits[limit]
	l.hits[limit] = 0
	l.last[limit] = now
	l.mu.Unlock()
	l.log.LogAttrs(ctx, slog.LevelWarn, "CA limit reached",
		slog.String("limit", limit),
		slog.String("remote", remote),
		slog.String("detail", detail),
		slog.Int("hits_since_last_log", n))
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if c.Write(&m) != nil {
		return 0
	}
	return m.GetCounter().GetValue()
}

func gaugeValue(g prometheus.Gauge) float64 {
	var m dto.Metric
	if g.Write(&m) != nil {
		return 0
	}
	return m.GetGauge().GetValue()
}
