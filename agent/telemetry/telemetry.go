// Package telemetry turns the proxy's connection events into the agent's
// metrics, access log and plaintext-exposure ledger. It owns the label
// values: the proxy reports typed reasons (proxy.RefusalReason), and this
// package maps them to the values documented in docs/operations.md (a test
// reads that table against the code). Capture statuses are defined here
// for the same reason.
package telemetry

import (
	"strings"
	"time"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/exposure"
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

// Config wires an Observer.
type Config struct {
	Metrics *admin.Metrics
	// Ledger records plaintext exposure; nil records none.
	Ledger *exposure.Ledger
	// State returns the current cluster state (workload names of peers).
	State func() *state.Snapshot
}

// Observer implements proxy.Observer.
type Observer struct{ cfg Config }

var _ proxy.Observer = (*Observer)(nil)

// New returns an Observer.
func New(cfg Config) *Observer { return &Observer{cfg: cfg} }

// Opened implements proxy.Observer.
func (o *Observer) Opened(c *proxy.ConnInfo) {
	o.cfg.Metrics.Opened(o.conn(&c.Flow, c.Start))
	o.cfg.Metrics.Setup(c.Flow.Direction.String(), SetupOK, c.Setup)
}

// Closed implements proxy.Observer.
func (o *Observer) Closed(c *proxy.ConnInfo, reason string) {
	o.cfg.Metrics.Closed(o.conn(&c.Flow, c.Start), c.Sent, c.Received, reason)
	if o.cfg.Ledger != nil {
		if e, ok := ExposureEvent(o.cfg.State(), c); ok {
			o.cfg.Ledger.Record(e)
		}
	}
}

// Refused implements proxy.Observer.
func (o *Observer) Refused(f *proxy.Flow, r *proxy.Refusal) {
	c := o.conn(f, time.Time{})
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

// conn describes a flow with Istio's labels.
func (o *Observer) conn(f *proxy.Flow, start time.Time) *admin.Conn {
	c := &admin.Conn{Src: f.Src, Dst: f.Dst, Start: start, DstService: f.Service, SecurityPolicy: admin.SecurityNone}
	if f.Transport == proxy.TransportHBONE {
		c.SecurityPolicy = admin.SecurityMutualTLS
	}
	if !f.SrcIdentity.IsZero() {
		c.SrcPrincipal = f.SrcIdentity.String()
	}
	if !f.DstIdentity.IsZero() {
		c.DstPrincipal = f.DstIdentity.String()
	}
	// Workload labels are controller names (Deployment, StatefulSet...),
	// as in Istio's metrics; the pod's name when it has no controller.
	snap := o.cfg.State()
	workload := func(ns, name string) string {
		if p := snap.Pod(ns, name); p != nil {
			return p.WorkloadName()
		}
		return name
	}
	switch f.Direction {
	case proxy.Outbound:
		c.Reporter = admin.ReporterSource
		if f.Workload != nil {
			c.SrcNamespace, c.SrcWorkload = f.Workload.Namespace, workload(f.Workload.Namespace, f.Workload.Name)
		}
		if f.DstWorkload != "" {
			ns, name := splitKey(f.DstWorkload)
			c.DstNamespace, c.DstWorkload = ns, workload(ns, name)
		}
	case proxy.Inbound:
		c.Reporter = admin.ReporterDestination
		if f.Workload != nil {
			c.DstNamespace, c.DstWorkload = f.Workload.Namespace, workload(f.Workload.Namespace, f.Workload.Name)
			c.DstPrincipal = f.Workload.Identity.String()
		}
		if p := snap.PodByIP(f.Src.Addr()); p != nil {
			c.SrcNamespace, c.SrcWorkload = p.Namespace, p.WorkloadName()
		}
	}
	return c
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
