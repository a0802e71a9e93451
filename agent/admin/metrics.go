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

// Values of the reporter, connection_security_policy, request_protocol and
// response_flags labels, as Istio spells them.
const (
	ReporterSource      = "source"
	ReporterDestination = "destination"
	SecurityMutualTLS   = "mutual_tls"
	SecurityNone        = "none"
	ProtocolTCP         = "tcp"
	// FlagsNone: the connection opened (Istio's "-").
	FlagsNone = "-"
	// FlagsDeny: refused by policy (ztunnel's DENY).
	FlagsDeny = "DENY"
	// FlagsConnect: the destination or the tunnel could not be reached
	// (ztunnel's CONNECT).
	FlagsConnect = "CONNECT"
	unknown      = "unknown"
)

// Peer is one end of a connection as Istio's labels describe it. Fields
// are "" when unknown (reported as "unknown", like Istio).
type Peer struct {
	// Workload is the controller's name (Deployment, StatefulSet...), the
	// pod's when it has none.
	Workload, Namespace string
	Principal           string // SPIFFE ID
	// CanonicalService and CanonicalRevision follow Istio's rules (see
	// telemetry.Canonical); they are also reported as *_app and
	// *_version, as ztunnel does.
	CanonicalService, CanonicalRevision string
	Cluster                             string
}

// Conn is one proxied connection as metrics and the access log see it.
type Conn struct {
	// Reporter is ReporterSource (the source's agent: outbound) or
	// ReporterDestination (the destination's agent: inbound).
	Reporter string
	Src, Dst netip.AddrPort
	// Source and Destination are the workloads at each end.
	Source, Destination Peer
	// DstService is the destination Service's FQDN
	// (name.namespace.svc.<cluster domain>), DstServiceName and
	// DstServiceNamespace its name and namespace; "" when the destination
	// was not reached through a Service.
	DstService, DstServiceName, DstServiceNamespace string
	SecurityPolicy                                  string // SecurityMutualTLS or SecurityNone
	// ResponseFlags is FlagsNone for a connection that opened, FlagsDeny
	// or FlagsConnect for one that did not.
	ResponseFlags string
	Start         time.Time
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
		"source_workload":                orUnknown(c.Source.Workload),
		"source_canonical_service":       orUnknown(c.Source.CanonicalService),
		"source_canonical_revision":      orUnknown(c.Source.CanonicalRevision),
		"source_workload_namespace":      orUnknown(c.Source.Namespace),
		"source_principal":               orUnknown(c.Source.Principal),
		"source_app":                     orUnknown(c.Source.CanonicalService),
		"source_version":                 orUnknown(c.Source.CanonicalRevision),
		"source_cluster":                 orUnknown(c.Source.Cluster),
		"destination_service":            orUnknown(c.DstService),
		"destination_service_namespace":  orUnknown(c.DstServiceNamespace),
		"destination_service_name":       orUnknown(c.DstServiceName),
		"destination_workload":           orUnknown(c.Destination.Workload),
		"destination_canonical_service":  orUnknown(c.Destination.CanonicalService),
		"destination_canonical_revision": orUnknown(c.Destination.CanonicalRevision),
		"destination_workload_namespace": orUnknown(c.Destination.Namespace),
		"destination_principal":          orUnknown(c.Destination.Principal),
		"destination_app":                orUnknown(c.Destination.CanonicalService),
		"destination_version":            orUnknown(c.Destination.CanonicalRevision),
		"destination_cluster":            orUnknown(c.Destination.Cluster),
		"request_protocol":               ProtocolTCP,
		"response_flags":                 orFlags(c.ResponseFlags),
		"connection_security_policy":     orUnknown(c.SecurityPolicy),
	}
}

func orFlags(s string) string {
	if s == "" {
		return FlagsNone
	}
	return s
}

// ConnLabelNames are the labels of the istio_tcp_* metrics: Istio's
// standard TCP labels as ztunnel reports them (without locality).
var ConnLabelNames = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision", "destination_workload_namespace",
	"destination_principal", "destination_app", "destination_version", "destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// PoolStats are the HBONE pool's counters (hbone.PoolStats, copied here so
// this package does not depend on the data path).
type PoolStats struct {
	Hits, Misses, Handshakes, HandshakeErrors uint64
	ScaleOuts, ResponseTimeouts, PingTimeouts uint64
	ExpiredConns                              uint64
	Conns, Streams                            int
}

// TunnelStats are the inbound HBONE servers' counters (hbone.ServerStats).
type TunnelStats struct {
	Conns, Streams, HandshakesInFlight int
	Handshakes, HandshakeErrors        uint64
	ExpiredConns                       uint64
	// Limits counts what the servers' limits refused or closed, by the
	// limit label of nodemesh_tunnel_limit_hits_total.
	Limits map[string]uint64
}

// Metrics are the agent's Prometheus metrics. The istio_tcp_* metrics
// have Istio's names, labels and byte directions (docs/operations.md says
// exactly what matches); bytes of open connections are added by whoever
// holds their Traffic, at the latest when a scrape calls the flush function
// (SetFlush), so long-lived connections show up while they last.
type Metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
	setup                          *prometheus.HistogramVec
	denied                         *prometheus.CounterVec
	capture                        *prometheus.GaugeVec
	requests                       *requestMetrics
	access                         *slog.Logger

	mu        sync.Mutex
	pool      func() PoolStats
	tunnels   func() TunnelStats
	flush     func()
	captureOf map[string]string // pod -> status label value set
}

// NewMetrics registers the metrics with reg. access, if not nil, receives
// one record per closed connection (the opt-in access log).
func NewMetrics(reg prometheus.Registerer, access *slog.Logger) (*Metrics, error) {
	m := &Metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total",
			Help: "TCP connections opened (also those refused or failed, whose close carries response_flags DENY or CONNECT)."}, ConnLabelNames),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total",
			Help: "TCP connections closed."}, ConnLabelNames),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total",
			Help: "Response bytes: sent by the destination back to the source, counted while the connection is open."}, ConnLabelNames),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total",
			Help: "Request bytes: sent by the source and received by the destination, counted while the connection is open."}, ConnLabelNames),
		setup: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "nodemesh_connection_setup_seconds",
			Help:    "Time from accepting a captured connection to the destination being connected (tunnel stream or passthrough dial).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 12)}, []string{"direction", "outcome"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nodemesh_connections_denied_total",
			Help: "Connections refused by the agent, by direction and reason (policy, strict_mtls, no_endpoints, error)."}, []string{"direction", "reason"}),
		capture: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "nodemesh_capture_status",
			Help: "1 for each local pod's current capture status (enrolled, verified, failed)."}, []string{"namespace", "pod", "status"}),
		requests:  newRequestMetrics(),
		access:    access,
		captureOf: make(map[string]string),
	}
	for _, c := range append([]prometheus.Collector{m.opened, m.closed, byteCollector{m}, m.setup, m.denied, m.capture, poolCollector{m}}, m.requests.collectors()...) {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Traffic adds one connection's bytes to the istio_tcp_*_bytes_total
// series of its labels (resolved once, when it opened).
type Traffic struct{ request, response prometheus.Counter }

// Add counts request bytes (source to destination: Istio's
// istio_tcp_received_bytes_total, "received during request") and response
// bytes (back: istio_tcp_sent_bytes_total, "sent during response").
func (t *Traffic) Add(request, response int64) {
	if request > 0 {
		t.request.Add(float64(request))
	}
	if response > 0 {
		t.response.Add(float64(response))
	}
}

// Opened counts a new connection and returns the counters its bytes go to.
func (m *Metrics) Opened(c *Conn) *Traffic {
	l := c.labels()
	m.opened.With(l).Inc()
	return &Traffic{request: m.received.With(l), response: m.sent.With(l)}
}

// Closed counts the end of a connection and access-logs it with its total
// bytes: sent from source to destination, received back. Its bytes are
// counted through its Traffic, not here. reason says why it ended ("eof",
// "reset", "policy", "drain"...).
func (m *Metrics) Closed(c *Conn, sent, received int64, reason string) {
	m.closed.With(c.labels()).Inc()
	m.log("connection", c, sent, received, reason)
}

// Refused counts a connection the agent refused before it opened (reason
// is a label value of nodemesh_connections_denied_total, from a small fixed
// set), in the istio_tcp_* metrics as ztunnel does (opened, then closed
// with c.ResponseFlags), and access-logs it with the full detail.
func (m *Metrics) Refused(c *Conn, reason, detail string) {
	m.Denied(c.direction(), reason)
	m.openedAndClosed(c)
	m.log("connection refused", c, 0, 0, detail)
}

// Failed records a connection whose setup failed (the destination or the
// tunnel did not answer): outcome is the setup histogram's outcome label,
// setup the time until the failure. It is not a denial. Like Refused, it
// counts an opened and a closed connection (with c.ResponseFlags).
func (m *Metrics) Failed(c *Conn, outcome string, setup time.Duration, detail string) {
	m.Setup(c.direction(), outcome, setup)
	m.openedAndClosed(c)
	m.log("connection failed", c, 0, 0, detail)
}

// openedAndClosed counts a connection that never carried bytes: opened
// with response_flags "-" and closed with its flags, as ztunnel reports a
// denied or failed connection.
func (m *Metrics) openedAndClosed(c *Conn) {
	open := *c
	open.ResponseFlags = FlagsNone
	m.opened.With(open.labels()).Inc()
	m.closed.With(c.labels()).Inc()
}

// SetFlush registers fn, called at every scrape before the byte counters
// are read: it adds the bytes open connections copied since the last call.
func (m *Metrics) SetFlush(fn func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flush = fn
}

// byteCollector is the two byte counter vectors, flushed before each
// collection.
type byteCollector struct{ m *Metrics }

func (b byteCollector) Describe(ch chan<- *prometheus.Desc) {
	b.m.sent.Describe(ch)
	b.m.received.Describe(ch)
}

func (b byteCollector) Collect(ch chan<- prometheus.Metric) {
	b.m.mu.Lock()
	fn := b.m.flush
	b.m.mu.Unlock()
	if fn != nil {
		fn()
	}
	b.m.sent.Collect(ch)
	b.m.received.Collect(ch)
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
			slog.String("src_workload", c.Source.Workload),
			slog.String("src_namespace", c.Source.Namespace),
			slog.String("src_spiffe_id", c.Source.Principal),
			slog.String("dst_workload", c.Destination.Workload),
			slog.String("dst_namespace", c.Destination.Namespace),
			slog.String("dst_spiffe_id", c.Destination.Principal),
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

// SetTunnelStats registers the source of the inbound HBONE server metrics.
func (m *Metrics) SetTunnelStats(fn func() TunnelStats) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tunnels = fn
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
	descPoolScaleOuts = prometheus.NewDesc("nodemesh_pool_scale_outs_total",
		"HBONE client connections opened because every connection to the peer was busy.", nil, nil)
	descPoolTimeouts = prometheus.NewDesc("nodemesh_pool_timeouts_total",
		"HBONE client timeouts: response (a CONNECT not answered in time, reset) or ping (a peer that did not answer a PING, connection closed).", []string{"reason"}, nil)
	descCertExpiryDrains = prometheus.NewDesc("nodemesh_tunnel_cert_expiry_drains_total",
		"HBONE connections that stopped taking new streams because a certificate of their handshake expired (GOAWAY, then closed after their last stream), by side: client (this node's pool) or server (port 15008).", []string{"side"}, nil)
	descTunnelConns = prometheus.NewDesc("nodemesh_tunnel_server_connections",
		"Open inbound HBONE connections (port 15008), handshaking ones included.", nil, nil)
	descTunnelStreams = prometheus.NewDesc("nodemesh_tunnel_server_streams",
		"Open inbound HBONE tunnels.", nil, nil)
	descTunnelHandshakes = prometheus.NewDesc("nodemesh_tunnel_server_handshakes_total",
		"Inbound HBONE mTLS handshakes, by result.", []string{"result"}, nil)
	descTunnelLimits = prometheus.NewDesc("nodemesh_tunnel_limit_hits_total",
		"Inbound HBONE connections closed or streams refused by a server limit (docs/security.md), by limit.", []string{"limit"}, nil)
)

// poolCollector reads the pool's counters at scrape time.
type poolCollector struct{ m *Metrics }

func (p poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descHandshakes
	ch <- descPool
	ch <- descPoolConns
	ch <- descPoolStreams
	ch <- descPoolScaleOuts
	ch <- descPoolTimeouts
	ch <- descCertExpiryDrains
	ch <- descTunnelConns
	ch <- descTunnelStreams
	ch <- descTunnelHandshakes
	ch <- descTunnelLimits
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
	ch <- prometheus.MustNewConstMetric(descPoolScaleOuts, prometheus.CounterValue, float64(s.ScaleOuts))
	ch <- prometheus.MustNewConstMetric(descPoolTimeouts, prometheus.CounterValue, float64(s.ResponseTimeouts), "response")
	ch <- prometheus.MustNewConstMetric(descPoolTimeouts, prometheus.CounterValue, float64(s.PingTimeouts), "ping")

	p.m.mu.Lock()
	tfn := p.m.tunnels
	p.m.mu.Unlock()
	var t TunnelStats
	if tfn != nil {
		t = tfn()
	}
	ch <- prometheus.MustNewConstMetric(descTunnelConns, prometheus.GaugeValue, float64(t.Conns+t.HandshakesInFlight))
	ch <- prometheus.MustNewConstMetric(descTunnelStreams, prometheus.GaugeValue, float64(t.Streams))
	ch <- prometheus.MustNewConstMetric(descTunnelHandshakes, prometheus.CounterValue, float64(t.Handshakes), "ok")
	ch <- prometheus.MustNewConstMetric(descTunnelHandshakes, prometheus.CounterValue, float64(t.HandshakeErrors), "error")
	ch <- prometheus.MustNewConstMetric(descCertExpiryDrains, prometheus.CounterValue, float64(s.ExpiredConns), "client")
	ch <- prometheus.MustNewConstMetric(descCertExpiryDrains, prometheus.CounterValue, float64(t.ExpiredConns), "server")
	for _, l := range TunnelLimits {
		ch <- prometheus.MustNewConstMetric(descTunnelLimits, prometheus.CounterValue, float64(t.Limits[l]), l)
	}
}

// TunnelLimits are the values of nodemesh_tunnel_limit_hits_total's limit
// label, each always exported.
var TunnelLimits = []string{"handshakes", "peer_connections", "timeout", "header_size", "streams", "flood", "ping_timeout"}

// NewAccessLog returns the access log stream: one JSON object per closed
// connection, written to w, separate from the agent's own log.
func NewAccessLog(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}
