package dataplane

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/redirect"
)

// Capture steers enrolled pods' connections to the agent's sockets inside
// each pod. *redirect.Capture, adapted by Redirect, is the real one;
// dataplanetest has an in-memory fake. Methods may be called concurrently.
type Capture interface {
	// Enroll captures a pod and returns its in-pod sockets. On error
	// nothing is left captured by this call.
	Enroll(ctx context.Context, pod redirect.Pod) (CapturedPod, error)
	// Update changes a captured pod's excluded ports in place, without
	// uncapturing it.
	Update(ctx context.Context, pod redirect.Pod) error
	// Unenroll stops capturing a pod Enroll returned and closes its
	// sockets.
	Unenroll(p CapturedPod) error
	// Dialer returns the dialer of the agent's own connections from inside
	// the network namespace netns (passthrough, tunnels, delivery to the
	// application), which capture must not redirect again.
	Dialer(netns string) proxy.Dialer
}

// CapturedPod is one captured pod.
type CapturedPod interface {
	// Sockets returns the agent's listeners in the pod. It is called
	// once, right after Enroll.
	Sockets() Sockets
	// SelfCheck proves that capture steers the pod's connections to its
	// sockets.
	SelfCheck(ctx context.Context) error
}

// Sockets are the agent's listeners inside one pod.
type Sockets struct {
	// Outbound accept captured outbound connections (15001); OrigDst
	// recovers each accepted connection's original destination.
	Outbound []net.Listener
	OrigDst  proxy.OrigDstFunc
	// Inbound accept steered inbound plaintext (15006); an accepted
	// socket's local address is its original destination.
	Inbound []net.Listener
	// HBONE accept tunnels (pod IP:15008).
	HBONE []net.Listener
}

// SVIDs holds the SVIDs of the served pods (identity/svid.Manager; the
// Workload API source would do too). The pods' TLS configurations are
// built from its identity.Provider side.
type SVIDs interface {
	identity.Provider
	// Add starts keeping an SVID for id on behalf of owner (a pod).
	Add(owner string, id spiffeid.ID) error
	// Remove drops owner's claim; an SVID no owner needs is dropped.
	Remove(owner string)
}

// Redirect adapts the eBPF capture to Capture.
func Redirect(c *redirect.Capture) Capture { return redirectCapture{c} }

type redirectCapture struct{ c *redirect.Capture }

func (r redirectCapture) Enroll(ctx context.Context, pod redirect.Pod) (CapturedPod, error) {
	ep, err := r.c.Enroll(ctx, pod)
	if err != nil {
		return nil, err
	}
	return &redirectPod{ep: ep}, nil
}

func (r redirectCapture) Update(ctx context.Context, pod redirect.Pod) error {
	_, err := r.c.Enroll(ctx, pod) // enrolling a captured pod again updates it in place
	return err
}

func (r redirectCapture) Unenroll(p CapturedPod) error {
	rp, ok := p.(*redirectPod)
	if !ok {
		return fmt.Errorf("unenrolling: %T was not enrolled by this capture", p)
	}
	return r.c.Unenroll(rp.ep)
}

func (r redirectCapture) Dialer(netns string) proxy.Dialer {
	return podDialer{&inpod.Dialer{Netns: netns, Mark: r.c.Mark()}}
}

// podDialer dials from inside a pod's network namespace (passthrough
// keeps the pod's source IP; inbound delivery, where it cannot be
// transparent, reaches the app as the pod itself), with the capture bypass
// mark.
type podDialer struct{ d *inpod.Dialer }

func (p podDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := p.d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err // not a typed nil *net.TCPConn in an interface
	}
	return c, nil
}

// inboundDialer is implemented by captured pods that deliver inbound
// connections to their applications themselves: the redirect capture does
// it from the peer's address (transparent delivery, docs/capture.md).
type inboundDialer interface {
	InboundDialer(base proxy.Dialer) proxy.Dialer
}

// InboundDialer returns the proxy's dialer for the pod: inbound flows go
// through redirect's DialInbound, everything else through base.
func (p *redirectPod) InboundDialer(base proxy.Dialer) proxy.Dialer {
	return deliveryDialer{ep: p.ep, base: base}
}

type deliveryDialer struct {
	ep   *redirect.EnrolledPod
	base proxy.Dialer
}

func (d deliveryDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	f, ok := proxy.FlowFromContext(ctx)
	dst, err := netip.ParseAddrPort(addr)
	if !ok || f.Direction != proxy.Inbound || err != nil {
		return d.base.DialContext(ctx, network, addr)
	}
	return d.ep.DialInbound(ctx, f.Src, dst, func() (net.Conn, error) { return d.base.DialContext(ctx, network, addr) })
}

// redirectPod hands the proxy captured connections: its outbound
// listeners answer capture self-check probes and record each original
// destination, which origDst then returns. Connections stay *net.TCPConn
// so the proxy's splice path applies.
type redirectPod struct {
	ep   *redirect.EnrolledPod
	dsts sync.Map // *net.TCPConn -> netip.AddrPort, from Accept to origDst
}

func (p *redirectPod) SelfCheck(ctx context.Context) error { return p.ep.SelfCheck(ctx) }

func (p *redirectPod) Sockets() Sockets {
	l := p.ep.Listeners
	s := Sockets{OrigDst: p.origDst}
	for _, ln := range l.Outbound {
		s.Outbound = append(s.Outbound, &outboundListener{TCPListener: ln, p: p})
	}
	for _, ln := range l.Inbound {
		s.Inbound = append(s.Inbound, ln)
	}
	for _, ln := range l.HBONE {
		s.HBONE = append(s.HBONE, ln)
	}
	return s
}

type outboundListener struct {
	*net.TCPListener
	p *redirectPod
}

func (l *outboundListener) Accept() (net.Conn, error) {
	c, dst, err := l.p.ep.AcceptOutbound(l.TCPListener)
	if err != nil {
		return nil, err
	}
	l.p.dsts.Store(c, dst)
	return c, nil
}

func (p *redirectPod) origDst(c net.Conn) (netip.AddrPort, error) {
	if tc, ok := c.(*net.TCPConn); ok {
		if v, ok := p.dsts.LoadAndDelete(tc); ok {
			return v.(netip.AddrPort), nil
		}
	}
	return netip.AddrPort{}, fmt.Errorf("no original destination recorded for %s", c.RemoteAddr())
}
