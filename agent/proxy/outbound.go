package proxy

import (
	"context"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
)

func (p *Proxy) handleOutbound(app net.Conn, w *Workload, origDst OrigDstFunc) {
	start := time.Now()
	pre := &Flow{Direction: Outbound, Workload: w, Src: podSource(w, addrPortOf(app.RemoteAddr())), SrcIdentity: w.Identity}
	dst, err := origDst(app)
	if err != nil {
		if ok, held := p.noOrigDstLog.allow(start); ok {
			p.log.Warn("connection without original destination (an application connecting to the agent's in-pod listener directly?); resetting it, and such connections are logged at most once a minute",
				"direction", "outbound", "pod", w.String(), "src", pre.Src.String(), "error", err, "not_logged_since_last", held)
		}
		p.refuse(app, pre, start, RefusedInvalid, "no original destination")
		return
	}
	pre.OrigDst, pre.Dst = dst, dst
	if p.isAgentPort(dst.Port()) && (dst.Addr().IsLoopback() || w.HasIP(dst.Addr())) {
		// A connection to the agent's own listener was captured: a
		// capture loop. Refuse rather than spin.
		if ok, held := p.loopLog.allow(start); ok {
			p.log.Warn("outbound connection to an agent port of the pod itself; resetting it, and such connections are logged at most once a minute",
				"pod", w.String(), "dst", dst.String(), "not_logged_since_last", held)
		}
		p.refuse(app, pre, start, RefusedInvalid, "capture loop")
		return
	}
	d, err := p.cfg.Resolver.Resolve(w, dst)
	if err == nil && len(d.Endpoints) == 0 {
		err = ErrNoEndpoints
	}
	if err != nil {
		p.log.Debug("outbound destination did not resolve; resetting", "pod", w.String(), "dst", dst.String(), "error", err)
		pre.Service = d.Service
		p.refuse(app, pre, start, resolveRefusal(err), err.Error())
		return
	}
	pre.Service = d.Service
	if d.L7 != nil && p.cfg.L7 != nil {
		p.outboundL7(app, pre, d, start)
		return
	}
	p.outboundL4(app, pre, d, start)
}

// outboundL4 picks an endpoint of d, checks egress policy and connects app
// to it through a tunnel or in plaintext.
func (p *Proxy) outboundL4(app net.Conn, pre *Flow, d Destination, start time.Time) {
	w, dst := pre.Workload, pre.OrigDst
	i, release := p.bal.pick(d.Endpoints)
	defer release()
	ep := d.Endpoints[i]
	c := &conn{start: start, flow: Flow{
		Direction:   Outbound,
		Transport:   TransportPlaintext,
		Workload:    w,
		Src:         pre.Src,
		SrcIdentity: w.Identity,
		OrigDst:     dst,
		Dst:         ep.Addr,
		Service:     d.Service,
		DstWorkload: ep.Workload,
	}}
	if ep.Enrolled {
		c.flow.Transport = TransportHBONE
		c.flow.DstIdentity = ep.Identity
	}
	if dec := p.cfg.Policy.Check(p.ctx, &c.flow); !dec.Allow {
		p.log.Debug("outbound connection denied", "pod", w.String(), "dst", dst.String(), "reason", dec.Reason)
		p.refuse(app, &c.flow, start, denied(dec), "denied: "+dec.Reason)
		return
	}
	if ep.Enrolled {
		p.outboundHBONE(app, c, ep)
	} else {
		p.passthrough(app, c)
	}
}

// resolveRefusal classifies a Resolver error.
func resolveRefusal(err error) RefusalReason {
	switch {
	case errors.Is(err, ErrNoEndpoints):
		return RefusedNoEndpoints
	case errors.Is(err, ErrStrictMTLS):
		return RefusedStrictMTLS
	}
	return RefusedInvalid
}

// passthrough copies to the chosen endpoint in plaintext. The endpoint,
// not a ClusterIP, is dialled so that the balancing decision (and the
// policy checked on it) is the one that takes effect.
func (p *Proxy) passthrough(app net.Conn, c *conn) {
	ctx, cancel := context.WithTimeout(context.WithValue(p.ctx, flowKey{}, &c.flow), p.cfg.ConnectTimeout)
	up, err := p.cfg.Dialer.DialContext(ctx, "tcp", c.flow.Dst.String())
	cancel()
	if err != nil {
		p.log.Debug("passthrough dial failed; resetting", "pod", c.flow.Workload.String(), "dst", c.flow.Dst.String(), "error", err)
		p.refuse(app, &c.flow, c.start, FailedDial, "dialing the destination: "+err.Error())
		return
	}
	c.kill = func() {
		hbone.ResetConn(app)
		hbone.ResetConn(up)
	}
	p.trk.add(c)
	defer p.trk.remove(c)
	if pipeConns(app, up, &c.sent, &c.recv) {
		c.failed.Store(true)
	}
}

func (p *Proxy) outboundHBONE(app net.Conn, c *conn, ep Endpoint) {
	ctx, cancel := context.WithCancel(p.ctx)
	defer cancel()
	port := ep.TunnelPort
	if port == 0 {
		port = hbone.Port
	}
	s, err := p.cfg.Pool.Connect(ctx, hbone.ConnectRequest{
		Key:    hbone.Key{Src: c.flow.SrcIdentity, Dst: ep.Identity, Addr: netip.AddrPortFrom(ep.Addr.Addr(), port), SrcNetns: c.flow.Workload.Netns},
		Target: ep.Addr,
		Header: connectHeader(&c.flow),
	})
	if err != nil {
		p.log.Debug("HBONE connect failed; resetting", "pod", c.flow.Workload.String(), "dst", ep.Addr.String(), "spiffe_id", ep.Identity.String(), "error", err)
		p.refuse(app, &c.flow, c.start, FailedTunnel, "opening the tunnel: "+err.Error())
		return
	}
	c.kill = func() {
		cancel()
		hbone.ResetConn(app)
	}
	p.trk.add(c)
	defer p.trk.remove(c)
	// This goroutine copies app -> tunnel; the connection's read loop
	// delivers tunnel -> app (hbone.Stream.Relay).
	if err := s.Relay(app, &c.sent, &c.recv); err != nil {
		c.failed.Store(true)
		s.Close()
		hbone.ResetConn(app)
		return
	}
	s.Close()
	app.Close()
}

// connectHeader returns the metadata headers ztunnel sends with a CONNECT.
func connectHeader(f *Flow) http.Header {
	h := make(http.Header, 3)
	h["Forwarded"] = []string{forwardedFor(f.Src.Addr())}
	h["Traceparent"] = []string{newTraceparent()}
	b := f.Workload.Baggage
	if b == "" {
		b = "k8s.namespace.name=" + f.Workload.Namespace + ",k8s.pod.name=" + f.Workload.Name
	}
	h["Baggage"] = []string{b}
	return h
}

// forwardedFor formats an RFC 7239 "for" parameter (IPv6 quoted and
// bracketed).
func forwardedFor(ip netip.Addr) string {
	if ip.Is6() && !ip.Is4In6() {
		return `for="[` + ip.String() + `]"`
	}
	return "for=" + ip.Unmap().String()
}

// newTraceparent starts a W3C trace context for the connection (version
// 00, random trace and span IDs, not sampled).
func newTraceparent() string {
	var b [55]byte
	copy(b[:], "00-")
	var ids [24]byte
	for i := 0; i < 24; i += 8 {
		v := rand.Uint64()
		for j := range 8 {
			ids[i+j] = byte(v >> (8 * j))
		}
	}
	hex.Encode(b[3:35], ids[:16])
	b[35] = '-'
	hex.Encode(b[36:52], ids[16:])
	copy(b[52:], "-00")
	return string(b[:])
}

// podSource maps the source of a captured connection to the pod's address:
// redirected to 127.0.0.1:15001, the kernel gives it a loopback source, but
// policy, logs and the Forwarded header want the pod IP.
func podSource(w *Workload, src netip.AddrPort) netip.AddrPort {
	if !src.Addr().IsLoopback() {
		return src
	}
	for _, ip := range w.IPs {
		if ip.Is4() == src.Addr().Is4() {
			return netip.AddrPortFrom(ip, src.Port())
		}
	}
	return netip.AddrPortFrom(w.IPs[0], src.Port())
}

func addrPortOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	case nil:
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
