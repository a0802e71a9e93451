package proxy_test

import (
	"context"
	"log/slog"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/proxy"
)

// Example shows how the node agent wires the data plane: one Pool and one
// Proxy per node, and three Serve calls per enrolled pod on the listeners
// opened in the pod's network namespace.
func Example() {
	var (
		log      = slog.Default()
		svids    func(spiffeid.ID) (x509svid.Source, error) // the SVID manager, per workload
		bundles  x509bundle.Source                          // the trust bundle
		resolver proxy.Resolver                             // reads the cluster-state snapshot
		policy   proxy.Policy                               // the policy engine
		dialer   proxy.Dialer                               // marks sockets, dials inside pod netns
		origDst  proxy.OrigDstFunc                          // capture's original-destination lookup
	)
	tlsP := hbone.SPIFFETLS{SVID: svids, Bundles: bundles}
	pool, err := hbone.NewPool(hbone.PoolConfig{TLS: tlsP, Dial: dialer.DialContext, Logger: log})
	if err != nil {
		return
	}
	defer pool.Close()
	p, err := proxy.New(proxy.Config{Logger: log, Resolver: resolver, Pool: pool, ServerTLS: tlsP, Dialer: dialer, Policy: policy})
	if err != nil {
		return
	}
	defer p.Close()

	// Per enrolled pod, with listeners from agent/inpod:
	var outbound, inbound, tunnel net.Listener
	pod := &proxy.Workload{Namespace: "shop", Name: "cart-1", Identity: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart"), IPs: []netip.Addr{netip.MustParseAddr("10.244.1.7")}}
	podCtx := context.Background() // cancelled when the pod leaves
	go p.ServeOutbound(podCtx, outbound, pod, origDst)
	go p.ServeInboundPlaintext(podCtx, inbound, pod, nil) // sk_lookup keeps the original destination
	go p.ServeInboundHBONE(podCtx, tunnel, pod)

	// On SIGTERM: p.Drain(ctxWithDeadline), then p.Close(), then pool.Close().
	// On a policy change: p.Reevaluate(ctx).
}
