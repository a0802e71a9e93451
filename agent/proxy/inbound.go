package proxy

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/l7"
)

// inboundHandler serves the HBONE tunnels of one workload.
type inboundHandler struct {
	p *Proxy
	w *Workload
}

func (h *inboundHandler) ServeTunnel(ctx context.Context, req *hbone.Request, t *hbone.Tunnel) {
	p, w := h.p, h.w
	start := time.Now()
	if !p.enter() {
		t.Refuse(http.StatusServiceUnavailable)
		return
	}
	defer p.wg.Done()
	log := p.log.With("pod", w.String(), "peer", req.Peer.String(), "dst", req.Target.String())
	c := &conn{start: start, flow: Flow{
		Direction:   Inbound,
		Transport:   TransportHBONE,
		Workload:    w,
		Src:         sourceOf(req),
		SrcIdentity: req.Peer,
		OrigDst:     req.Target,
		Dst:         req.Target,
		DstIdentity: w.Identity,
		DstWorkload: w.String(),
	}}
	if !w.HasIP(req.Target.Addr()) {
		// Never dial on a peer's say-so: the tunnel is for this pod only.
		log.Debug("CONNECT refused: target is not this pod's IP")
		t.Refuse(http.StatusBadRequest)
		p.report(&c.flow, start, RefusedInvalid, "target is not this pod")
		return
	}
	if p.isAgentPort(req.Target.Port()) {
		log.Debug("CONNECT refused: target is an agent port")
		t.Refuse(http.StatusBadRequest)
		p.report(&c.flow, start, RefusedInvalid, "target is an agent port")
		return
	}
	var proto l7.Protocol
	if p.cfg.L7 != nil {
		proto, c.flow.L7 = p.cfg.L7.InboundPort(w, req.Target.Port())
	}
	if dec := p.cfg.Policy.Check(ctx, &c.flow); !dec.Allow {
		log.Debug("CONNECT denied by policy", "reason", dec.Reason)
		t.Refuse(http.StatusUnauthorized)
		p.report(&c.flow, start, denied(dec), "denied: "+dec.Reason)
		return
	}
	if c.flow.L7 {
		// The application is dialled per request by the L7 layer.
		if err := t.Accept(); err != nil {
			return
		}
		p.inboundL7(ctx, t, c, proto)
		return
	}
	dctx, cancel := context.WithTimeout(context.WithValue(ctx, flowKey{}, &c.flow), p.cfg.ConnectTimeout)
	app, err := p.cfg.Dialer.DialContext(dctx, "tcp", req.Target.String())
	cancel()
	if err != nil {
		log.Debug("dialing the application failed", "error", err)
		t.Refuse(http.StatusServiceUnavailable)
		p.report(&c.flow, start, FailedDial, "dialing the application: "+err.Error())
		return
	}
	if err := t.Accept(); err != nil {
		app.Close()
		return
	}
	c.kill = func() { hbone.ResetConn(app) }
	p.trk.add(c)
	defer p.trk.remove(c)
	// This goroutine copies app -> tunnel; the connection's read loop
	// delivers tunnel -> app (hbone.Tunnel.Relay). Half-closes travel
	// independently both ways.
	if err := t.Relay(app, &c.sent, &c.recv); err != nil {
		c.failed.Store(true)
		t.Reset()
		hbone.ResetConn(app)
		return
	}
	app.Close()
}

// sourceOf returns the flow's source: the tunnel's TCP peer, which is the
// source pod's IP because the source agent dials from inside that pod's
// network namespace (as ztunnel does). The Forwarded header is not trusted
// for it: a peer could claim any address there.
func sourceOf(req *hbone.Request) netip.AddrPort {
	return req.RemoteAddr
}

func (p *Proxy) handleInboundPlaintext(c net.Conn, w *Workload, origDst OrigDstFunc) {
	tc := &conn{start: time.Now(), flow: Flow{
		Direction:   Inbound,
		Transport:   TransportPlaintext,
		Workload:    w,
		Src:         addrPortOf(c.RemoteAddr()),
		DstIdentity: w.Identity,
		DstWorkload: w.String(),
	}}
	f := &tc.flow
	if origDst != nil {
		dst, err := origDst(c)
		if err != nil {
			if ok, held := p.noOrigDstLog.allow(tc.start); ok {
				p.log.Warn("connection without original destination; resetting it, and such connections are logged at most once a minute",
					"direction", "inbound", "pod", w.String(), "src", f.Src.String(), "error", err, "not_logged_since_last", held)
			}
			p.refuse(c, f, tc.start, RefusedInvalid, "no original destination")
			return
		}
		f.Dst = dst
	} else {
		f.Dst = addrPortOf(c.LocalAddr())
	}
	f.OrigDst = f.Dst
	log := p.log.With("pod", w.String(), "src", f.Src.String(), "dst", f.Dst.String())
	if p.isAgentPort(f.Dst.Port()) {
		log.Debug("plaintext to an agent port refused")
		p.refuse(c, f, tc.start, RefusedInvalid, "target is an agent port")
		return
	}
	// The Policy decides the mTLS mode too (STRICT refuses plaintext, with
	// its exemptions such as kubelet probes from the pod's node).
	if dec := p.cfg.Policy.Check(p.ctx, f); !dec.Allow {
		log.Debug("plaintext connection denied by policy", "reason", dec.Reason)
		p.refuse(c, f, tc.start, denied(dec), "denied: "+dec.Reason)
		return
	}
	ctx, cancel := context.WithTimeout(context.WithValue(p.ctx, flowKey{}, f), p.cfg.ConnectTimeout)
	app, err := p.cfg.Dialer.DialContext(ctx, "tcp", f.Dst.String())
	cancel()
	if err != nil {
		log.Debug("dialing the application failed; resetting", "error", err)
		p.refuse(c, f, tc.start, FailedDial, "dialing the application: "+err.Error())
		return
	}
	tc.kill = func() {
		hbone.ResetConn(c)
		hbone.ResetConn(app)
	}
	p.trk.add(tc)
	defer p.trk.remove(tc)
	if pipeConns(c, app, &tc.sent, &tc.recv) {
		tc.failed.Store(true)
	}
}
