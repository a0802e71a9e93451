package admin

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Values of the reporter and connection_security_policy labels, as Istio
// spells them.
const (
	ReporterSource      = "source"
	ReporterDestination = "destination"
	SecurityMutualTLS   = "mutual_tls"
	SecurityNone        = "none"
	unknown             = "unknown"
)

// Conn is one proxied connection as metrics and the access log see it.
// Workload fields are "" when unknown (reported as "unknown", like Istio).
type Conn struct {
	// Reporter is ReporterSource (the source's agent: outbound) or
	// ReporterDestination (the destination's agent: inbound).
	Reporter                                string
	Src, Dst                                netip.AddrPort
	SrcWorkload, SrcNamespace, SrcPrincipal string
	DstWorkload, DstNamespace, DstPrincipal string
	DstService                              string
	SecurityPolicy                          string // SecurityMutualTLS or SecurityNone
	Start                                   time.Time
}

func orUnknown(s string) string {
	if s == "" {
		return unknown
	}
	return s
}

func (c *Conn) labels() prometheus.Labels {
	return prometheus.Labels{
		"reporter":                       orUnknown(c.Reporter),
		"source_workload":                orUnknown(c.SrcWorkload),
		"source_workload_namespace":      orUnknown(c.SrcNamespace),
		"source_principal":               orUnknown(c.SrcPrincipal),
		"destination_workload":           orUnknown(c.DstWorkload),
		"destination_workload_namespace": orUnknown(c.DstNamespace),
		"destination_principal":          orUnknown(c.DstPrincipal),
		"destination_service":            orUnknown(c.DstService),
		"connection_security_policy":     orUnknown(c.SecurityPolicy),
	}
}

var connLabelNames = []string{
	"reporter", "source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_service", "connection_security_policy",
}

// PoolStats are the HBONE pool's counters (hbone.PoolStats, copied here so
// this package does not depend on the data path).
type PoolStats struct {
	Hits, Misses, Handshakes, HandshakeErrors uint64
	Conns, Streams                            int
}

// Metrics are the agent's Prometheus metrics. The istio_tcp_* metrics
// have Istio's names and some of its labels (not yet enough for Istio's
// dashboards: see docs/operations.md); bytes are counted when a connection
// closes (Istio also reports long connections periodically; /connections
// shows bytes of open ones).
type Metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
	setup                          *prometheus.HistogramVec
	denied                         *prometheus.CounterVec
	capture                        *prometheus.GaugeVec
	access                         *slog.Logger

	mu        sync.Mutex
	pool      func() PoolStats
	captureOf map[string]string // pod -> status label value set
}

// NewMetrics registers the metrics with reg. access, if not nil, receives
// one record per closed connection (the opt-in access log).
func NewMetrics(reg prometheus.Registerer, access *slog.Logger) (*Metrics, error) {
	m := &Metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total",
			Help: "TCP connections opened."}, connLabelNames),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total",
			Help: "TCP connections closed."}, connLabelNames),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total",
			Help: "Bytes sent by the source towards the destination, counted when the connection closes."}, connLabelNames),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total",
			Help: "Bytes received by the source from the destination, counted when the connection closes."}, connLabelNames),
		setup: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "nodemesh_connection_setup_seconds",
			Help:    "Time from accepting a captured connection to the destination being connected (tunnel stream or passthrough dial).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 12)}, []string{"direction", "outcome"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nodemesh_connections_denied_total",
			Help: "Connections refused by the agent, by direction and reason (policy, strict_mtls, no_endpoints, error)."}, []string{"direction", "reason"}),
		capture: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "nodemesh_capture_status",
			Help: "1 for each local pod's current capture status (enrolled, verified, failed)."}, []string{"namespace", "pod", "status"}),
		access:    access,
		captureOf: make(map[string]string),
	}
	for _, c := range []prometheus.Collector{m.opened, m.closed, m.sent, m.received, m.setup, m.denied, m.capture, poolCollector{m}} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Opened records a new connection.
func (m *Metrics) Opened(c *Conn) {
	m.opened.With(c.labels()).Inc()
}

// Closed records the end of a connection: sent bytes went from source to
// destination, received bytes back. reason says why it ended ("eof",
// "reset by peer", "policy", "drain"...).
func (m *Metrics) Closed(c *Conn, sent, received int64, reason string) {
	l := c.labels()
	m.closed.With(l).Inc()
	if sent > 0 {
		m.sent.With(l).Add(float64(sent))
	}
	if received > 0 {
		m.received.With(l).Add(float64(received))
	}
	m.log("connection", c, sent, received, reason)
}

// Refused counts a connection the agent refused before it opened (reason
// is a label value of nodemesh_connections_denied_total, from a small fixed
// set) and access-logs it with the full detail.
func (m *Metrics) Refused(c *Conn, reason, detail string) {
	m.Denied(c.direction(), reason)
	m.log("connection refused", c, 0, 0, detail)
}

// Failed records a connection whose setup failed (the destination or the
// tunnel did not answer): outcome is the setup histogram's outcome label,
// setup the time until the failure. It is not a denial.
func (m *Metrics) Failed(c *Conn, outcome string, setup time.Duration, detail string) {
	m.Setup(c.direction(), outcome, setup)
	m.log("connection failed", c, 0, 0, detail)
}

func (c *Conn) direction() string {
	if c.Reporter == ReporterSource {
		return "outbound"
	}
	return "inbound"
}

func (m *Metrics) log(msg string, c *Conn, sent, received int64, reason string) {
	if m.access != nil {
		var dur time.Duration
		if !c.Start.IsZero() {
			dur = time.Since(c.Start)
		}
		m.access.LogAttrs(context.Background(), slog.LevelInfo, msg,
			slog.String("reporter", c.Reporter),
			slog.String("src", c.Src.String()),
			slog.String("dst", c.Dst.String()),
			slog.String("src_workload", c.SrcWorkload),
			slog.String("src_namespace", c.SrcNamespace),
			slog.String("src_spiffe_id", c.SrcPrincipal),
			slog.String("dst_workload", c.DstWorkload),
			slog.String("dst_namespace", c.DstNamespace),
			slog.String("dst_spiffe_id", c.DstPrincipal),
			slog.String("dst_service", c.DstService),
			slog.String("security", c.SecurityPolicy),
			slog.Int64("bytes_sent", sent),
			slog.Int64("bytes_received", received),
			slog.Float64("duration_ms", float64(dur.Microseconds())/1000),
			slog.String("close_reason", reason),
		)
	}
}

// Setup observes how long a connection took to set up. direction is
// "outbound" or "inbound", outcome "ok" or a failure (Failed).
func (m *Metrics) Setup(direction, outcome string, d time.Duration) {
	m.setup.WithLabelValues(direction, outcome).Observe(d.Seconds())
}

// Denied counts a refused connection.
func (m *Metrics) Denied(direction, reason string) {
	m.denied.WithLabelValues(direction, reason).Inc()
}

// SetCaptureStatus sets a local pod's capture status; "" removes the pod.
func (m *Metrics) SetCaptureStatus(namespace, pod, status string) {
	key := namespace + "/" + pod
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.captureOf[key]; ok && old != status {
		m.capture.DeleteLabelValues(namespace, pod, old)
		delete(m.captureOf, key)
	}
	if status == "" {
		return
	}
	m.capture.WithLabelValues(namespace, pod, status).Set(1)
	m.captureOf[key] = status
}

// SetPoolStats registers the source of the HBONE pool metrics.
func (m *Metrics) SetPoolStats(fn func() PoolStats) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pool = fn
}

var (
	descHandshakes = prometheus.NewDesc("nodemesh_tunnel_handshakes_total",
		"HBONE mTLS handshakes by this node's pool, by result.", []string{"result"}, nil)
	descPool = prometheus.NewDesc("nodemesh_pool_requests_total",
		"HBONE streams opened: hit (on an existing connection) or miss (needed a new one).", []string{"result"}, nil)
	descPoolConns = prometheus.NewDesc("nodemesh_pool_connections",
		"Open HBONE client connections.", nil, nil)
	descPoolStreams = prometheus.NewDesc("nodemesh_pool_streams",
		"Open HBONE client streams.", nil, nil)
)

// poolCollector reads the pool's counters at scrape time.
type poolCollector struct{ m *Metrics }

func (p poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descHandshakes
	ch <- descPool
	ch <- descPoolConns
	ch <- descPoolStreams
}

func (p poolCollector) Collect(ch chan<- prometheus.Metric) {
	p.m.mu.Lock()
	fn := p.m.pool
	p.m.mu.Unlock()
	var s PoolStats
	if fn != nil {
		s = fn()
	}
	ch <- prometheus.MustNewConstMetric(descHandshakes, prometheus.CounterValue, float64(s.Handshakes), "ok")
	ch <- prometheus.MustNewConstMetric(descHandshakes, prometheus.CounterValue, float64(s.HandshakeErrors), "error")
	ch <- prometheus.MustNewConstMetric(descPool, prometheus.CounterValue, float64(s.Hits), "hit")
	ch <- prometheus.MustNewConstMetric(descPool, prometheus.CounterValue, float64(s.Misses), "miss")
	ch <- prometheus.MustNewConstMetric(descPoolConns, prometheus.GaugeValue, float64(s.Conns))
	ch <- prometheus.MustNewConstMetric(descPoolStreams, prometheus.GaugeValue, float64(s.Streams))
}

// NewAccessLog returns the access log stream: one JSON object per closed
// connection, written to w, separate from the agent's own log.
func NewAccessLog(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}
