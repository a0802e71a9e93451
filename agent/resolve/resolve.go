// Package resolve is the agent's only proxy.Resolver: it maps the original
// destination of an outbound connection to the endpoints that serve it,
// from the current cluster state (agent/state). A Service ClusterIP:port
// becomes its ready EndpointSlice backends; any other address is itself.
//
// Each endpoint is reached over HBONE when it is an enrolled pod, serves
// the port through capture, and its node has an agent ready to terminate
// tunnels (agent/rollout); otherwise in plaintext, unless the pod is STRICT
// on that port, which is refused with proxy.ErrStrictMTLS (never plaintext
// to a STRICT pod). The mTLS mode comes from the policy engine
// (agent/enforce), the only owner of STRICT.
package resolve

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Config wires a Resolver. Every function must be safe for concurrent use
// and must not block.
type Config struct {
	// State returns the current cluster state.
	State func() *state.Snapshot
	// MeshCapable reports whether node has an agent ready to terminate
	// tunnels.
	MeshCapable func(node string) bool
	// Strict reports whether pod ("namespace/name") requires mTLS on
	// port; unknown must be true (fail closed).
	Strict func(pod string, port uint16) bool
	// Log receives refusals (Warn). Nil discards.
	Log *slog.Logger
}

// Resolver implements proxy.Resolver.
type Resolver struct{ cfg Config }

var _ proxy.Resolver = (*Resolver)(nil)

// New checks cfg and returns a Resolver.
func New(cfg Config) (*Resolver, error) {
	if cfg.State == nil || cfg.MeshCapable == nil || cfg.Strict == nil {
		return nil, errors.New("creating the resolver: Config.State, MeshCapable and Strict are required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Resolver{cfg: cfg}, nil
}

// Resolve implements proxy.Resolver.
func (r *Resolver) Resolve(src *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
	snap := r.cfg.State()
	if svc, port, ok := snap.ServiceByVIP(dst); ok {
		bs := snap.Backends(svc, port)
		if len(bs) == 0 {
			return proxy.Destination{}, fmt.Errorf("service %s port %d: %w", svc.Key(), port.Port, proxy.ErrNoEndpoints)
		}
		d := proxy.Destination{Service: svc.Key().String(), Endpoints: make([]proxy.Endpoint, 0, len(bs))}
		var refused error
		for _, b := range bs {
			ep, err := r.endpoint(b.Addr, snap.BackendPod(b))
			if err != nil {
				refused = err
				continue
			}
			d.Endpoints = append(d.Endpoints, ep)
		}
		if len(d.Endpoints) == 0 {
			r.cfg.Log.Warn("refusing outbound connection", "pod", workload(src), "dst", dst.String(), "service", d.Service, "reason", refused)
			return proxy.Destination{Service: d.Service}, fmt.Errorf("service %s port %d: %w", svc.Key(), port.Port, refused)
		}
		d.L7 = L7Target(snap, svc, port)
		return d, nil
	}
	ep, err := r.endpoint(dst, snap.PodByIP(dst.Addr()))
	if err != nil {
		r.cfg.Log.Warn("refusing outbound connection", "pod", workload(src), "dst", dst.String(), "reason", err)
		return proxy.Destination{}, err
	}
	return proxy.Destination{Endpoints: []proxy.Endpoint{ep}}, nil
}

func workload(w *proxy.Workload) string {
	if w == nil {
		return ""
	}
	return w.String()
}

// endpoint decides how addr (pod p, nil if not a known pod) is reached.
func (r *Resolver) endpoint(addr netip.AddrPort, p *state.Pod) (proxy.Endpoint, error) {
	ep := proxy.Endpoint{Addr: addr}
	if p == nil {
		return ep, nil
	}
	ep.Workload = p.Ref
	// Host-network pods are never in PodByIP; a pod that excluded the
	// port from inbound capture is reached in plaintext.
	if !p.Enrolled || p.Identity.IsZero() || slices.Contains(p.ExcludeInboundPorts(), addr.Port()) {
		return ep, nil
	}
	if r.cfg.MeshCapable(p.Node) {
		ep.Enrolled = true
		ep.Identity = p.Identity
		return ep, nil
	}
	if r.cfg.Strict(p.Ref, addr.Port()) {
		return ep, fmt.Errorf("%s (%s on node %s) has no ready nodemesh agent: %w", p.Ref, addr, p.Node, proxy.ErrStrictMTLS)
	}
	return ep, nil
}

// L7Target returns the L7 handling of a Service port: nil (L4) unless the
// Service or its namespace opted in (l7.OptedIn) and the port's
// appProtocol does not say it is something other than HTTP.
func L7Target(snap *state.Snapshot, svc *state.Service, port state.ServicePort) *proxy.L7Target {
	var nsLabels map[string]string
	if ns := snap.Namespace(svc.Namespace); ns != nil {
		nsLabels = ns.Labels
	}
	if !l7.OptedIn(nsLabels, svc.Labels) {
		return nil
	}
	p := l7.DeclaredProtocol(port.AppProtocol)
	if p == l7.TCP {
		return nil
	}
	return &proxy.L7Target{Protocol: p, Namespace: svc.Namespace, Name: svc.Name, Port: port.Port}
}
