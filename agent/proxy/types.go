package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Agent ports (the same numbers as Istio's). A tunnel may never target
// them, and an outbound connection to one of them on the workload itself is
// a capture loop.
const (
	PortAdmin            = 15000
	PortOutbound         = 15001
	PortInboundPlaintext = 15006
	PortHBONE            = 15008
	PortMetrics          = 15020
	PortReadiness        = 15021
)

// DefaultAgentPorts are the ports inbound tunnels must not reach.
var DefaultAgentPorts = []uint16{PortAdmin, PortOutbound, PortInboundPlaintext, PortHBONE, PortMetrics, PortReadiness}

// Workload is the enrolled pod whose connections a listener handles.
type Workload struct {
	Namespace, Name string
	Identity        spiffeid.ID
	IPs             []netip.Addr
	// Netns is opaque to the proxy: the pod's network namespace (path),
	// copied to hbone.Key.SrcNetns so that the pool dials each pod's
	// tunnels from inside that pod. Dialers find it in
	// FlowFromContext(ctx).Workload.
	Netns string
	// Baggage is sent in the baggage header of outbound CONNECTs, like
	// ztunnel's ("k8s.namespace.name=...,k8s.deployment.name=...").
	// Empty: built from Namespace and Name.
	Baggage string
}

// HasIP reports whether ip is one of the workload's addresses.
func (w *Workload) HasIP(ip netip.Addr) bool {
	return slices.Contains(w.IPs, ip.Unmap())
}

// String returns namespace/name.
func (w *Workload) String() string { return w.Namespace + "/" + w.Name }

// Endpoint is one backend of a destination.
type Endpoint struct {
	Addr     netip.AddrPort // pod IP and the application port to reach
	Workload string         // namespace/name of the pod, "" if not a known pod
	// Enrolled endpoints are reached through HBONE and must present
	// Identity; others get plaintext passthrough.
	Enrolled bool
	Identity spiffeid.ID
	// TunnelPort is the endpoint's HBONE port; 0 means 15008.
	TunnelPort uint16
}

// Destination is what an original destination resolves to.
type Destination struct {
	// Service is "namespace/name" when the original destination was a
	// Service's ClusterIP:port, else "".
	Service string
	// Endpoints are the ready candidates. For a pod IP or an address
	// outside the cluster, the single endpoint is that address itself.
	Endpoints []Endpoint
	// L7 is set when the Service opted in to HTTP handling (agent/l7);
	// nil keeps the connection at L4.
	L7 *L7Target
}

// ErrNoEndpoints is returned (wrapped) by a Resolver for a Service without
// ready endpoints; the application sees its connection refused.
var ErrNoEndpoints = errors.New("service has no ready endpoints")

// Resolver maps the original destination of an outbound connection of src
// to the endpoints that can serve it. It reads the agent's current cluster
// state, so that changes apply to new connections at once; it must not
// block.
type Resolver interface {
	Resolve(src *Workload, dst netip.AddrPort) (Destination, error)
}

// ResolverFunc adapts a function to Resolver.
type ResolverFunc func(src *Workload, dst netip.AddrPort) (Destination, error)

// Resolve implements Resolver.
func (f ResolverFunc) Resolve(src *Workload, dst netip.AddrPort) (Destination, error) {
	return f(src, dst)
}

// Dialer opens the agent's own connections: plaintext passthrough to a
// destination, and connections to the local application on inbound. The
// agent's implementation marks its sockets so capture does not redirect
// them again, and for inbound dials from inside the pod's network
// namespace; FlowFromContext tells it which flow a dial is for. *net.Dialer
// implements it.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// OrigDstFunc recovers the destination an application dialled before
// capture redirected its connection to the outbound listener.
type OrigDstFunc func(c net.Conn) (netip.AddrPort, error)

// Direction is outbound (from a local workload) or inbound (to one).
type Direction uint8

// Directions.
const (
	Outbound Direction = iota + 1
	Inbound
)

func (d Direction) String() string {
	switch d {
	case Outbound:
		return "outbound"
	case Inbound:
		return "inbound"
	}
	return "unknown"
}

// MarshalText implements encoding.TextMarshaler, for JSON listings.
func (d Direction) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Transport says how a flow's bytes travel.
type Transport uint8

// Transports.
const (
	// TransportHBONE: an mTLS tunnel (outbound to an enrolled pod, or inbound on 15008).
	TransportHBONE Transport = iota + 1
	// TransportPlaintext: plaintext (outbound passthrough, or inbound on 15006).
	TransportPlaintext
)

func (t Transport) String() string {
	switch t {
	case TransportHBONE:
		return "hbone"
	case TransportPlaintext:
		return "plaintext"
	}
	return "unknown"
}

// MarshalText implements encoding.TextMarshaler, for JSON listings.
func (t Transport) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// Flow describes one proxied connection, for policy, logs and listings.
type Flow struct {
	Direction Direction
	Transport Transport
	// Workload is the local pod: the source of an outbound flow, the
	// destination of an inbound one.
	Workload *Workload
	Src      netip.AddrPort
	// SrcIdentity is the source's SPIFFE ID: the local workload's on
	// outbound; the mTLS-verified peer's on inbound HBONE; zero on inbound
	// plaintext.
	SrcIdentity spiffeid.ID
	// OrigDst is the address the application dialled (a ClusterIP for a
	// Service); Dst is the endpoint actually reached.
	OrigDst, Dst netip.AddrPort
	// DstIdentity is the identity the destination must prove (outbound
	// HBONE) or has (inbound); zero for plaintext destinations.
	DstIdentity spiffeid.ID
	Service     string // namespace/name when OrigDst was a Service
	DstWorkload string // namespace/name of the destination pod, if known
	// L7 is true when the connection's requests are handled (and, inbound,
	// authorised one by one) by the L7 layer; policy then defers L7 rules
	// to the requests.
	L7 bool
}

type flowKey struct{}

// FlowFromContext returns the flow a Dialer call is made for.
func FlowFromContext(ctx context.Context) (*Flow, bool) {
	f, ok := ctx.Value(flowKey{}).(*Flow)
	return f, ok
}

// Decision is a policy verdict with a reason for logs.
type Decision struct {
	Allow bool
	// Refusal classifies a denial: RefusedPolicy (also when zero) or
	// RefusedStrictMTLS (plaintext to a port that requires mTLS).
	Refusal RefusalReason
	Reason  string
}

// Policy decides whether a flow may proceed. It is called before a
// connection is set up and again by Reevaluate for open connections. It
// must be fast and must not block. It is the only place that decides
// inbound plaintext against the mTLS mode (STRICT and its exemptions): the
// proxy has no mode of its own that could contradict it.
type Policy interface {
	Check(ctx context.Context, f *Flow) Decision
}

// PolicyFunc adapts a function to Policy.
type PolicyFunc func(ctx context.Context, f *Flow) Decision

// Check implements Policy.
func (p PolicyFunc) Check(ctx context.Context, f *Flow) Decision { return p(ctx, f) }

// ErrStrictMTLS is returned (wrapped) by a Resolver for a destination that
// requires mTLS but cannot be reached through a tunnel; the connection is
// refused with RefusedStrictMTLS, never sent in plaintext.
var ErrStrictMTLS = errors.New("destination requires mTLS (STRICT) but cannot be reached through a tunnel")

// RefusalReason says why a connection was refused or failed before it
// opened. Each value has a stable label (String) for metrics.
type RefusalReason uint8

// Refusal reasons. The first four are refusals (the agent decided); the
// Failed ones are connection failures (the destination or the tunnel did
// not answer).
const (
	// RefusedPolicy: the Policy denied the flow.
	RefusedPolicy RefusalReason = iota + 1
	// RefusedStrictMTLS: plaintext to, or without a tunnel towards, a port
	// whose mTLS mode is STRICT.
	RefusedStrictMTLS
	// RefusedNoEndpoints: the destination resolved to nothing reachable.
	RefusedNoEndpoints
	// RefusedInvalid: the request itself is wrong (no original
	// destination, a capture loop, a tunnel target that is not the pod or
	// is an agent port, a Resolver error of another kind).
	RefusedInvalid
	// FailedDial: dialling the passthrough destination or the local
	// application failed.
	FailedDial
	// FailedTunnel: the HBONE tunnel or its CONNECT stream could not be
	// opened.
	FailedTunnel
	// RefusedLimit: a per-pod limit (Config.MaxInboundPlaintext) was
	// reached; the connection is reset at once.
	RefusedLimit
)

// RefusalReasons lists every reason, for tests and documentation.
var RefusalReasons = []RefusalReason{RefusedPolicy, RefusedStrictMTLS, RefusedNoEndpoints, RefusedInvalid, FailedDial, FailedTunnel, RefusedLimit}

func (r RefusalReason) String() string {
	switch r {
	case RefusedPolicy:
		return "policy"
	case RefusedStrictMTLS:
		return "strict_mtls"
	case RefusedNoEndpoints:
		return "no_endpoints"
	case RefusedInvalid:
		return "invalid"
	case FailedDial:
		return "dial_failed"
	case FailedTunnel:
		return "tunnel_failed"
	case RefusedLimit:
		return "limit"
	}
	return "unknown"
}

// Failure reports whether r is a connection failure rather than a refusal.
func (r RefusalReason) Failure() bool { return r == FailedDial || r == FailedTunnel }

// Refusal describes a connection refused or failed before it opened.
type Refusal struct {
	Reason RefusalReason
	// Detail is the human-readable cause, for logs.
	Detail string
	// Setup is the time from accepting the connection to the refusal.
	Setup time.Duration
}
