package main

import (
	"github.com/nodemesh/nodemesh/agent/exposure"
	"github.com/nodemesh/nodemesh/agent/proxy"
)

// setupExposure creates the exposure ledger (a data plane feeds it) and
// serves its report on the admin API (`nodemeshctl exposure`).
func (a *agent) setupExposure() error {
	if !a.cfg.Dataplane {
		return nil
	}
	l, err := exposure.New(exposure.Config{Node: a.cfg.NodeName, Registerer: a.reg})
	if err != nil {
		return err
	}
	a.ledger = l
	a.admin.Handle(exposure.Path, exposure.Handler(l))
	return nil
}

// exposureEvent turns a closed connection into a ledger event: plaintext
// that left an enrolled pod (outbound passthrough) or reached one
// (PERMISSIVE inbound). HBONE connections are not exposure.
func (dp *dataplane) exposureEvent(c *proxy.ConnInfo) (exposure.Event, bool) {
	f := c.Flow
	if f.Transport != proxy.TransportPlaintext || f.Workload == nil {
		return exposure.Event{}, false
	}
	snap := dp.a.store.Snapshot()
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

func (dp *dataplane) recordExposure(c *proxy.ConnInfo) {
	if dp.a.ledger == nil {
		return
	}
	if e, ok := dp.exposureEvent(c); ok {
		dp.a.ledger.Record(e)
	}
}
