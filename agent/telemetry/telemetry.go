// Package telemetry turns the proxy's connection events into the agent's
// metrics, access log and plaintext-exposure ledger. It owns the label
// values: Istio's labels of the istio_tcp_* metrics (workloads, canonical
// service and revision, the Service's FQDN, cluster, response_flags) are
// derived here from the flow and the cluster state, and the proxy's typed
// reasons (proxy.RefusalReason) are mapped to the values documented in
// docs/operations.md (tests read those tables against the code). Capture
// statuses are defined here for the same reason.
package telemetry

import (
	"strings"
	"sync"
	"time"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/exposure"
	l7mesh "github.com/nodemesh/nodemesh/agent/l7/mesh"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

// CaptureStatus is a local pod's capture status, the status label of
// nodemesh_capture_status and the config dump's.
type CaptureStatus string

// Capture statuses.
const (
	CaptureEnrolled CaptureStatus = "enrolled" // captured, self-check not passed yet
	CaptureVerified CaptureStatus = "verified" // the self-check proved capture works
	CaptureFailed   CaptureStatus = "failed"   // enrollment or the self-check failed
)

// CaptureStatuses lists every status the agent reports.
var CaptureStatuses = []CaptureStatus{CaptureEnrolled, CaptureVerified, CaptureFailed}

// SetupOK is the setup histogram's outcome for a connection that opened.
const SetupOK = "ok"

// DeniedLabel returns the reason label of nodemesh_connections_denied_total
// for a refusal, and false for a setup failure (which is not a denial and
// is counted by the setup histogram's outcome, SetupOutcome).
func DeniedLabel(r proxy.RefusalReason) (string, bool) {
	switch r {
	case proxy.RefusedPolicy, proxy.RefusedStrictMTLS, proxy.RefusedNoEndpoints, proxy.RefusedLimit:
		return r.String(), true
	case proxy.FailedDial, proxy.FailedTunnel:
		return "", false
	}
	return "error", true // RefusedInvalid, and anything new not mapped yet
}

// SetupOutcome returns the outcome label of nodemesh_connection_setup_seconds
// for a setup failure.
func SetupOutcome(r proxy.RefusalReason) string { return r.String() }

// ResponseFlags returns the response_flags label of a connection refused
// or failed for r, with ztunnel's values: DENY when the agent refused it
// (policy, STRICT mTLS, a limit, an invalid request), CONNECT when the
// destination could not be reached (no endpoint, dial or tunnel failure).
func ResponseFlags(r proxy.RefusalReason) string {
	switch r {
	case proxy.RefusedNoEndpoints, proxy.FailedDial, proxy.FailedTunnel:
		return admin.FlagsConnect
	}
	return admin.FlagsDeny
}

// Config wires an Observer.
type Config struct {
	Metrics *admin.Metrics
	// Ledger records plaintext exposure; nil records none.
	Ledger *exposure.Ledger
	// State returns the current cluster state (workload names of peers).
	State func() *state.Snapshot
	// ClusterDomain is the cluster's DNS domain, the suffix of
	// destination_service; default DefaultClusterDomain.
	ClusterDomain string
	// ClusterID is this cluster's name in source_cluster and
	// destination_cluster; default DefaultClusterID.
	ClusterID string
}

// Observer implements proxy.Observer. It keeps the byte counters of every
// open connection and adds what they moved to the istio_tcp_*_bytes_total
// series at each scrape (admin.Metrics.SetFlush), so a long-lived
// connection's traffic shows up while it lasts; the data path only does
// its atomic adds.
type Observer struct {
	cfg     Config
	inbound inboundServices

	mu   sync.Mutex
	open map[proxy.ByteCounters]*openConn
}

// openConn is an open connection's labels, its series and the bytes
// already added to them.
type openConn struct {
	conn           *admin.Conn
	traffic        *admin.Traffic
	sent, received int64
}

var _ proxy.Observer = (*Observer)(nil)

// New returns an Observer and registers its flush with cfg.Metrics.
func New(cfg Config) *Observer {
	if cfg.ClusterDomain == "" {
		cfg.ClusterDomain = DefaultClusterDomain
	}
	if cfg.ClusterID == "" {
		cfg.ClusterID = DefaultClusterID
	}
	o := &Observer{cfg: cfg, open: make(map[proxy.ByteCounters]*openConn)}
	cfg.Metrics.SetFlush(o.Flush)
	return o
}

// Refresh brings the index the Observer guesses inbound connections'
// Services from to snap, off the connection path; the agent calls it on
// every state change. It does nothing until the first inbound connection
// has built the index.
func (o *Observer) Refresh(snap *state.Snapshot) { o.inbound.refresh(snap) }

// Opened implements proxy.Observer.
func (o *Observer) Opened(c *proxy.ConnInfo) {
	conn := o.conn(&c.Flow, c.Start)
	oc := &openConn{conn: conn, traffic: o.cfg.Metrics.Opened(conn)}
	o.mu.Lock()
	o.open[c.Bytes] = oc
	o.mu.Unlock()
	o.cfg.Metrics.Setup(c.Flow.Direction.String(), SetupOK, c.Setup)
}

// Closed implements proxy.Observer.
func (o *Observer) Closed(c *proxy.ConnInfo, reason string) {
	o.mu.Lock()
	oc, ok := o.open[c.Bytes]
	if ok {
		delete(o.open, c.Bytes)
		oc.traffic.Add(c.Sent-oc.sent, c.Received-oc.received)
	}
	o.mu.Unlock()
	if !ok {
		// Opened always comes first on the connection's goroutine; this is
		// a caller that broke the contract. Count it without bytes.
		oc = &openConn{conn: o.conn(&c.Flow, c.Start)}
	}
	o.cfg.Metrics.Closed(oc.conn, c.Sent, c.Received, reason)
	if o.cfg.Ledger != nil {
		if e, ok := ExposureEvent(o.cfg.State(), c); ok {
			o.cfg.Ledger.Record(e)
		}
	}
}

// Flush adds the bytes open connections moved since the last flush. The
// metrics call it before every scrape; it takes one lock and reads two
// atomics per open connection.
func (o *Observer) Flush() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for bc, oc := range o.open {
		sent, received := bc.Load()
		oc.traffic.Add(sent-oc.sent, received-oc.received)
		oc.sent, oc.received = max(oc.sent, sent), max(oc.received, received)
	}
}

// Refused implements proxy.Observer.
func (o *Observer) Refused(f *proxy.Flow, r *proxy.Refusal) {
	c := o.conn(f, time.Time{})
	c.ResponseFlags = ResponseFlags(r.Reason)
	if label, denied := DeniedLabel(r.Reason); denied {
		o.cfg.Metrics.Refused(c, label, r.Detail)
		return
	}
	o.cfg.Metrics.Failed(c, SetupOutcome(r.Reason), r.Setup, r.Detail)
}

func splitKey(s string) (ns, name string) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		return "", s
	}
	return ns, name
}

// conn describes a flow with Istio's labels. Workload labels are
// controller names (Deployment, StatefulSet...), as in Istio's metrics;
// the pod's name when it has no controller.
func (o *Observer) conn(f *proxy.Flow, start time.Time) *admin.Conn {
	c := new(admin.Conn)
	o.fillConn(c, f, start)
	return c
}

// fillConn is conn, into c.
func (o *Observer) fillConn(c *admin.Conn, f *proxy.Flow, start time.Time) {
	*c = admin.Conn{Src: f.Src, Dst: f.Dst, Start: start, SecurityPolicy: admin.SecurityNone, ResponseFlags: admin.FlagsNone}
	if f.Transport == proxy.TransportHBONE {
		c.SecurityPolicy = admin.SecurityMutualTLS
	}
	var srcPrincipal, dstPrincipal string
	if !f.SrcIdentity.IsZero() {
		srcPrincipal = f.SrcIdentity.String()
	}
	if !f.DstIdentity.IsZero() {
		dstPrincipal = f.DstIdentity.String()
	}
	snap := o.cfg.State()
	// peerOf labels namespace/name, the pod's own labels when the state
	// knows it.
	peerOf := func(ns, name, principal string) admin.Peer {
		if p := snap.Pod(ns, name); p != nil {
			return o.peer(p, principal)
		}
		svc, rev := Canonical(nil, name)
		return admin.Peer{Workload: name, Namespace: ns, Principal: principal, CanonicalService: svc, CanonicalRevision: rev, Cluster: o.cfg.ClusterID}
	}
	service := f.Service
	switch f.Direction {
	case proxy.Outbound:
		c.Reporter = admin.ReporterSource
		if f.Workload != nil {
			c.Source = peerOf(f.Workload.Namespace, f.Workload.Name, srcPrincipal)
		}
		if f.DstWorkload != "" {
			ns, name := splitKey(f.DstWorkload)
			c.Destination = peerOf(ns, name, dstPrincipal)
		} else {
			c.Destination.Principal = dstPrincipal
		}
	case proxy.Inbound:
		c.Reporter = admin.ReporterDestination
		if f.Workload != nil {
			if !f.Workload.Identity.IsZero() {
				dstPrincipal = f.Workload.Identity.String()
			}
			c.Destination = peerOf(f.Workload.Namespace, f.Workload.Name, dstPrincipal)
		}
		if p := snap.PodByIP(f.Src.Addr()); p != nil {
			c.Source = o.peer(p, srcPrincipal)
		} else {
			c.Source.Principal = srcPrincipal
		}
		if service == "" && f.Dst.IsValid() {
			if k, ok := o.inbound.lookup(snap, f.Dst); ok {
				service = k.String()
			}
		}
	}
	if service != "" {
		ns, name := splitKey(service)
		c.DstService, c.DstServiceName, c.DstServiceNamespace = ServiceFQDN(name, ns, o.cfg.ClusterDomain), name, ns
	}
}

// ExposureEvent turns a closed connection into a ledger event: plaintext
// that left an enrolled pod (outbound passthrough) or reached one
// (PERMISSIVE inbound). HBONE connections are not exposure.
func ExposureEvent(snap *state.Snapshot, c *proxy.ConnInfo) (exposure.Event, bool) {
	f := c.Flow
	if f.Transport != proxy.TransportPlaintext || f.Workload == nil {
		return exposure.Event{}, false
	}
	e := exposure.Event{Bytes: c.Sent + c.Received}
	switch f.Direction {
	case proxy.Outbound:
		e.Direction = exposure.Outbound
		e.Src, e.SrcNamespace = f.Workload.String(), f.Workload.Namespace
		if p := snap.PodByIP(f.Dst.Addr()); p != nil {
			e.Dst, e.DstNamespace, e.DstEnrolled = p.Ref, p.Namespace, p.Enrolled
		} else {
			e.Dst = f.Dst.Addr().String()
		}
	case proxy.Inbound:
		e.Direction = exposure.Inbound
		e.Dst, e.DstNamespace, e.DstEnrolled = f.Workload.String(), f.Workload.Namespace, true
		if p := snap.PodByIP(f.Src.Addr()); p != nil {
			e.Src, e.SrcNamespace = p.Ref, p.Namespace
		} else {
			e.Src = f.Src.Addr().String()
		}
	default:
		return exposure.Event{}, false
	}
	return e, true
}

// Request implements the L7 layer's observer (agent/l7/mesh): one request
// in Istio's request metrics, with the connection's labels (the
// destination is the endpoint the request went to) and the access log.
func (o *Observer) Request(ri *l7mesh.RequestInfo) {
	r := admin.Request{
		Protocol: ri.Protocol, Method: ri.Method, Path: ri.Path,
		Status: ri.Status, GRPCStatus: ri.GRPCStatus, Flags: ri.Flags, Duration: ri.Duration,
		RequestBytes: ri.RequestBytes, ResponseBytes: ri.ResponseBytes,
	}
	o.fillConn(&r.Conn, ri.Flow, time.Time{})
	o.cfg.Metrics.Request(&r)
}
