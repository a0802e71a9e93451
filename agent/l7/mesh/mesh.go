// Package mesh is the agent's L7 request path: it implements proxy.L7, the
// seam through which agent/proxy hands over the connections of Services
// opted in to HTTP handling (docs/l7.md).
//
//   - Outbound, at the source agent: the client's connection is served with
//     net/http (agent/l7.ServeConn); each request is routed (agent/l7/route:
//     HTTPRoute and GRPCRoute), sent to an endpoint picked per request with
//     the L4 balancer over the proxy's tunnels (proxy.L7Outbound), with the
//     route's timeouts and retries under a retry budget (agent/l7/retry).
//   - Inbound, at the destination agent: the tunnel's requests are prepared
//     (agent/l7/authz: normalised path, refused ambiguities), authorised one
//     by one with AuthorizationPolicy's L7 fields (Config.Authorize), and
//     forwarded to the application; a denied request gets 403 and the
//     connection stays open.
//
// A connection whose first bytes are not HTTP (on a port that declares no
// appProtocol) goes back to the L4 path, and the choice is logged.
package mesh

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/l7/authz"
	"github.com/nodemesh/nodemesh/agent/l7/resilience"
	"github.com/nodemesh/nodemesh/agent/l7/retry"
	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/l7/tracing"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Config wires a Layer. Functions must be safe for concurrent use and must
// not block.
type Config struct {
	Log *slog.Logger
	// State returns the current cluster state (opted-in Services, their
	// backends, routes' backend Services).
	State func() *state.Snapshot
	// Routes returns the compiled HTTPRoutes and GRPCRoutes (nil: none).
	Routes func() *route.Table
	// Traffic returns the compiled TrafficPolicies (nil: none).
	Traffic func() *resilience.Set
	// Authorize decides one request at the destination
	// (enforce.Policy.CheckRequest).
	Authorize func(f *proxy.Flow, r *authz.Request) proxy.Decision
	// RequestHeaders are the header names policy conditions use (nil: none).
	RequestHeaders func() []string
	// Observer receives every request (nil: none).
	Observer Observer
	// Tracer records a span per request and passes the W3C trace context
	// on (nil: no tracing, traceparent is forwarded untouched).
	Tracer *tracing.Tracer
	// DetectTimeout bounds protocol detection on ports that declare no
	// appProtocol (default l7.DefaultDetectTimeout).
	DetectTimeout time.Duration
	// IdleTimeout closes a client connection idle between requests
	// (default 5 minutes).
	IdleTimeout time.Duration
	// MaxMirrors bounds the mirrored requests (RequestMirror) in flight
	// in the agent; a copy beyond it is dropped (default 64).
	// MirrorTimeout bounds each one (default 10 s).
	MaxMirrors    int
	MirrorTimeout time.Duration
	// NetHTTPOnly serves every connection with net/http's server and
	// forwards with its ReverseProxy and Transport, without the lean
	// HTTP/1.1 path (l7.ServeHTTP1, docs/l7.md). The lean path falls back
	// to that for what it does not handle; tests run both.
	NetHTTPOnly bool
}

// Layer implements proxy.L7.
type Layer struct {
	cfg     Config
	log     *slog.Logger
	budgets *retry.Budgets
	limiter *resilience.Limiter
	index   atomic.Pointer[inboundIndex]
	// refreshMu serialises Refresh, which updates claims.
	refreshMu sync.Mutex
	claims    l7.ClaimIndex
	// mirrorSlots holds a token per mirrored request in flight.
	mirrorSlots chan struct{}
	// mirrorsDropped counts the copies not sent because every slot was
	// taken or the body was too large to copy.
	mirrorsDropped atomic.Uint64
	// buffers are the reverse proxies' copy buffers.
	buffers bufferPool
}

var _ proxy.L7 = (*Layer)(nil)

// New checks cfg and returns a Layer.
func New(cfg Config) (*Layer, error) {
	if cfg.State == nil || cfg.Authorize == nil {
		return nil, errors.New("creating the L7 layer: Config.State and Authorize are required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Routes == nil {
		empty := route.Compile(nil, nil)
		cfg.Routes = func() *route.Table { return empty }
	}
	if cfg.Traffic == nil {
		empty := resilience.Compile(nil)
		cfg.Traffic = func() *resilience.Set { return empty }
	}
	if cfg.RequestHeaders == nil {
		cfg.RequestHeaders = func() []string { return nil }
	}
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	if cfg.DetectTimeout <= 0 {
		cfg.DetectTimeout = l7.DefaultDetectTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	if cfg.MaxMirrors <= 0 {
		cfg.MaxMirrors = DefaultMaxMirrors
	}
	if cfg.MirrorTimeout <= 0 {
		cfg.MirrorTimeout = DefaultMirrorTimeout
	}
	return &Layer{cfg: cfg, log: cfg.Log, budgets: retry.NewBudgets(retry.DefaultPercent, retry.DefaultMinConcurrency),
		limiter: resilience.NewLimiter(0), mirrorSlots: make(chan struct{}, cfg.MaxMirrors)}, nil
}

// inboundIndex is the claimed inbound ports (l7.ClaimedPorts) of one
// state snapshot version.
type inboundIndex struct {
	version uint64
	claims  l7.Claims
}

// Refresh brings the index of claimed inbound ports to snap if it is newer
// than the index. The agent calls it on every change of the cluster
// state, off the connection path, so that InboundPort never does; it
// updates only what the change touched (l7.ClaimIndex).
func (l *Layer) Refresh(snap *state.Snapshot) {
	if idx := l.index.Load(); idx != nil && idx.version >= snap.Version() {
		return
	}
	l.refreshMu.Lock()
	defer l.refreshMu.Unlock()
	// Never replace a newer index (two callers racing).
	if idx := l.index.Load(); idx != nil && idx.version >= snap.Version() {
		return
	}
	l.index.Store(&inboundIndex{version: snap.Version(), claims: l.claims.Update(snap)})
}

// InboundPort implements proxy.L7: the target ports of opted-in Services
// whose backends include w, as of the last Refresh (the first call builds
// the index from Config.State if Refresh was never called). It is on the
// path of every inbound tunnel: when nothing has opted in it is one atomic
// load and a count.
func (l *Layer) InboundPort(w *proxy.Workload, port uint16) (l7.Protocol, bool) {
	idx := l.index.Load()
	if idx == nil {
		l.Refresh(l.cfg.State())
		idx = l.index.Load()
	}
	if idx.claims.Pods() == 0 {
		return 0, false
	}
	return idx.claims.Port(state.Key{Namespace: w.Namespace, Name: w.Name}, port)
}

// Claims reports whether the layer handles a pod's port at L7, as
// InboundPort does (for policy explain).
func (l *Layer) Claims(pod state.Key, port uint16) bool {
	_, ok := l.InboundPort(&proxy.Workload{Namespace: pod.Namespace, Name: pod.Name}, port)
	return ok
}

// detect resolves an undeclared protocol from the client's first bytes. It
// returns the connection to use (with the bytes read put back) and false
// when the connection is not HTTP.
func (l *Layer) detect(c net.Conn, p l7.Protocol, log *slog.Logger) (net.Conn, l7.Protocol, bool) {
	if p != l7.Undeclared {
		return c, p, true
	}
	got, prefix, err := l7.Detect(c, l.cfg.DetectTimeout)
	c = l7.Replay(c, prefix)
	if err != nil || got == l7.TCP {
		reason := "the first bytes are not an HTTP/1.x request line or the HTTP/2 preface"
		if err != nil {
			reason = err.Error()
		} else if len(prefix) == 0 {
			reason = "the client sent nothing within the detection window (a server-first protocol?)"
		}
		log.Debug("l7 fallback to L4", "reason", reason)
		return c, l7.TCP, false
	}
	return c, got, true
}

// Inbound implements proxy.L7: authorise each request, then forward it to
// the application.
func (l *Layer) Inbound(i *proxy.L7Inbound) {
	log := l.log.With("pod", i.Flow.Workload.String(), "src", i.Flow.Src.String(), "dst", i.Flow.Dst.String())
	c, p, ok := l.detect(i.Conn, i.Protocol, log)
	if !ok {
		i.FallbackL4(c)
		return
	}
	up := newUpstream(func(ctx context.Context, _ string) (net.Conn, error) { return i.DialApp(ctx) })
	defer up.close()
	pool := newLeanPool(func(ctx context.Context, _ string, _ proxy.Endpoint) (net.Conn, error) { return i.DialApp(ctx) })
	defer pool.close()
	leanRoundTrip := func(r *http.Request) (*http.Response, error) { return pool.roundTrip(r, "", proxy.Endpoint{}) }
	var handlers sync.WaitGroup
	defer handlers.Wait()
	app := i.Flow.Dst.String()
	rp := l.reverseProxy(up, func(*http.Request) (string, bool) { return app, true })
	flow := i.Flow
	// The span's name and attributes are the connection's: built once,
	// and only when tracing is on.
	var spanName string
	var spanAttrs []attribute.KeyValue
	if l.cfg.Tracer != nil {
		spanName = "inbound|" + strconv.Itoa(int(flow.Dst.Port())) + "|" + flow.Workload.String()
		spanAttrs = []attribute.KeyValue{attribute.String("peer.principal", flow.SrcIdentity.String()), attribute.String("k8s.pod", flow.Workload.String())}
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		// The recorder and the authorization request, in one allocation.
		call := &inboundCall{rw: recorder{ResponseWriter: w}}
		rw := &call.rw
		r, span := l.cfg.Tracer.Start(r, trace.SpanKindServer, spanName, spanAttrs...)
		defer func() {
			span.End(rw.statusOr200(), orDash(rw.flags))
			l.cfg.Observer.Request(l.requestInfo(&flow, r, rw, start, proxy.Inbound))
		}()
		req := &call.req
		var err error
		*req, err = authz.Prepare(r, l.cfg.RequestHeaders())
		if err != nil {
			http.Error(rw, err.Error(), http.StatusBadRequest)
			return
		}
		if d := l.cfg.Authorize(&flow, req); !d.Allow {
			log.Debug("request denied", "method", req.Method, "path", req.Path, "reason", d.Reason)
			rw.denied, rw.flags = true, "RBAC"
			writeDenied(rw, r)
			return
		}
		if lw, ok := w.(*l7.LeanWriter); ok {
			r.URL.Host = app
			l.forwardLean(rw, lw, r, pool, leanRoundTrip)
			return
		}
		rp.ServeHTTP(rw, r)
	})
	l.serve(i.Ctx, c, p, counted(&handlers, h))
}

// serve serves a client connection: HTTP/1.x on the lean path, which
// falls back to net/http's server for what it does not handle, and
// HTTP/2 with net/http's server.
func (l *Layer) serve(ctx context.Context, c net.Conn, p l7.Protocol, h http.Handler) {
	if p == l7.HTTP1 && !l.cfg.NetHTTPOnly {
		l7.ServeHTTP1(ctx, c, h, l.cfg.IdleTimeout)
		return
	}
	l7.ServeConn(ctx, c, p, h, l.cfg.IdleTimeout)
}

// writeDenied answers 403 as Istio's proxies do (gRPC: PERMISSION_DENIED).
func writeDenied(w http.ResponseWriter, r *http.Request) {
	if route.IsGRPC(r) {
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Grpc-Status", "7")
		w.Header().Set("Grpc-Message", "RBAC: access denied")
		w.WriteHeader(http.StatusOK)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusForbidden)
	_, _ = io.WriteString(w, authz.DeniedBody)
}

// writeStatus answers a request the agent itself refuses: status for HTTP,
// a trailers-only response with grpcStatus for gRPC.
func writeStatus(w http.ResponseWriter, r *http.Request, status, grpcStatus int, msg string) {
	if route.IsGRPC(r) {
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Grpc-Status", strconv.Itoa(grpcStatus))
		w.Header().Set("Grpc-Message", msg)
		w.WriteHeader(http.StatusOK)
		return
	}
	http.Error(w, msg, status)
}

// Outbound implements proxy.L7: route each request and send it to an
// endpoint picked for it.
func (l *Layer) Outbound(o *proxy.L7Outbound) {
	log := l.log.With("pod", o.Flow.Workload.String(), "dst", o.Flow.OrigDst.String(), "service", o.Flow.Service)
	c, p, ok := l.detect(o.Conn, o.Target.Protocol, log)
	if !ok {
		o.FallbackL4(c)
		return
	}
	out := &outbound{l: l, o: o, log: log}
	if l.cfg.Tracer != nil {
		// The span's name and attributes are the connection's: built
		// once, and only when tracing is on.
		out.spanName = o.Target.Name + "." + o.Target.Namespace + ".svc:" + strconv.Itoa(int(o.Target.Port)) + "/*"
		out.spanAttrs = []attribute.KeyValue{attribute.String("k8s.pod", o.Flow.Workload.String()),
			attribute.String("peer.service", o.Target.Namespace+"/"+o.Target.Name)}
	}
	out.up = newUpstream(out.dial)
	out.lean = newLeanPool(o.Dial)
	var handlers sync.WaitGroup
	defer func() {
		// Mirrors may outlive the client's requests (never longer than
		// Config.MirrorTimeout) and have connections of their own.
		out.lean.close()
		out.up.close()
		handlers.Wait()
		out.closeMirrors()
	}()
	out.rp = l.reverseProxy(out.up, nil)
	out.rp.Transport = out
	l.serve(o.Ctx, c, p, counted(&handlers, out))
}

// maxRetryBody is the largest request body buffered so that it can be
// sent again on a retry.
const maxRetryBody = 64 << 10

type outbound struct {
	l   *Layer
	o   *proxy.L7Outbound
	log *slog.Logger
	up  *upstream
	rp  *httputil.ReverseProxy
	// lean is the upstream connections of requests on the lean path.
	lean     *leanPool
	spanName string
	// spanAttrs are the connection's span attributes (nil without a
	// tracer).
	spanAttrs []attribute.KeyValue
	// mirrors are the mirrored requests in flight; mirrorUp their
	// connections (created by the first mirror).
	mirrorMu     sync.Mutex
	mirrorClosed bool
	mirrorUp     *upstream
	mirrors      sync.WaitGroup
	// mirrorSend sends one copy; nil is roundTripMirror (tests replace it).
	mirrorSend func(ctx context.Context, up *upstream, c *mirrorCopy, body []byte) error
}

// routed is what ServeHTTP decided about a request, for RoundTrip.
type routed struct {
	service string // namespace/name of the backend Service
	dest    proxy.Destination
	rule    *route.Rule // nil: no route
	backend *route.Backend
	start   time.Time
	ep      proxy.Endpoint // the last attempt's endpoint
	picked  bool
	// lean: the request came on the lean path; it goes out on the
	// outbound's leanPool.
	lean bool
}

type routedKey struct{}

// inboundCall holds what one request at the destination agent keeps
// beyond its handler's frame: its recorder and its authorization request.
type inboundCall struct {
	rw  recorder
	req authz.Request
}

// outboundCall holds what one request at the source agent keeps beyond
// ServeHTTP's frame: its recorder, its routing decision (in the request's
// context) and the flow its metrics are labelled with.
type outboundCall struct {
	rw   recorder
	rt   routed
	flow proxy.Flow
}

type endpointKey struct{}

// endpointFor is the endpoint a transport dial is for.
type endpointFor struct {
	service string
	ep      proxy.Endpoint
}

func (out *outbound) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	o := out.o
	// What the request needs to outlive this frame, in one allocation.
	call := &outboundCall{rw: recorder{ResponseWriter: w}}
	rw := &call.rw
	lw, _ := w.(*l7.LeanWriter)
	rt := &call.rt
	*rt = routed{service: o.Flow.Service, dest: o.Dest, start: start, lean: lw != nil}
	r, span := out.l.cfg.Tracer.Start(r, trace.SpanKindClient, out.spanName, out.spanAttrs...)
	defer func() {
		if span == nil {
			return
		}
		attrs := []attribute.KeyValue{attribute.String("upstream_cluster", rt.service)}
		if rt.picked {
			attrs = append(attrs, attribute.String("upstream.address", rt.ep.Addr.String()))
		}
		span.End(rw.statusOr200(), orDash(rw.flags), attrs...)
	}()
	defer func() {
		f := &call.flow
		*f = o.Flow
		f.Service = rt.service
		if rt.picked {
			// The last attempt's endpoint, for the destination labels.
			f.Dst, f.DstWorkload, f.DstIdentity = rt.ep.Addr, rt.ep.Workload, rt.ep.Identity
			f.Transport = proxy.TransportPlaintext
			if rt.ep.Enrolled {
				f.Transport = proxy.TransportHBONE
			}
		}
		out.l.cfg.Observer.Request(out.l.requestInfo(f, r, rw, start, proxy.Outbound))
	}()
	target := route.ServiceKey{Namespace: o.Target.Namespace, Name: o.Target.Name}
	// TrafficPolicy, before routing: the rate limit, then the faults.
	if tp := out.l.cfg.Traffic().For(target); tp != nil {
		if !out.l.limiter.Allow(target, o.Flow.SrcIdentity.String(), tp.Limit, time.Now()) {
			rw.Header().Set("X-Nodemesh-Ratelimited", "1")
			rw.flags = "RL"
			writeStatus(rw, r, http.StatusTooManyRequests, 8, "local rate limited")
			return
		}
		f := tp.Fault(rand.Float64)
		if f.Delay > 0 {
			select {
			case <-time.After(f.Delay):
			case <-r.Context().Done():
				return
			}
		}
		if f.Abort {
			rw.flags = "FI"
			writeStatus(rw, r, f.HTTPStatus, f.GRPCStatus, "fault filter abort")
			return
		}
	}
	res := out.l.cfg.Routes().Match(target, o.Target.Port, o.Flow.Workload.Namespace, r)
	if res.Attached {
		rule := res.Rule
		if rule == nil {
			rw.flags = "NR"
			http.Error(rw, "no route matches the request", http.StatusNotFound)
			return
		}
		if rule.Refused != nil {
			http.Error(rw, "the route's rule cannot be honoured: "+rule.Refused.Error(), http.StatusInternalServerError)
			return
		}
		if rule.Redirect != nil {
			rule.ResponseHeaders.Apply(rw.Header())
			rw.Header().Set("Location", rule.Redirect.Location(r, o.Target.Port, o.Target.Name+"."+o.Target.Namespace+".svc"))
			rw.WriteHeader(rule.Redirect.Status)
			return
		}
		b := rule.Pick(rand.IntN)
		if b == nil || b.Invalid != nil {
			http.Error(rw, "the route's backend cannot be used", http.StatusInternalServerError)
			return
		}
		rt.rule, rt.backend = rule, b
		dest, err := out.resolveBackend(b)
		if err != nil {
			out.log.Debug("route backend did not resolve", "backend", b.Service.String(), "error", err)
			http.Error(rw, "no healthy upstream", http.StatusServiceUnavailable)
			return
		}
		rt.service, rt.dest = b.Service.String(), dest
		if rule.RequestTimeout > 0 {
			ctx, cancel := context.WithTimeout(r.Context(), rule.RequestTimeout)
			defer cancel()
			r = r.WithContext(ctx)
		}
		// The rule's filters, then the backendRef's; each mirror copies
		// the request as its own filter list leaves it.
		fwd := r.WithContext(context.WithValue(r.Context(), routedKey{}, rt))
		rule.RequestHeaders.Apply(fwd.Header)
		fwd = rewrite(fwd, rule.Rewrite)
		mirrors := out.sampleMirrors(fwd, rule.Mirrors, nil)
		b.RequestHeaders.Apply(fwd.Header)
		fwd = rewrite(fwd, b.Rewrite)
		mirrors = out.sampleMirrors(fwd, b.Mirrors, mirrors)
		out.mirror(fwd, mirrors)
		out.forward(rw, lw, fwd)
		return
	}
	out.forward(rw, lw, r.WithContext(context.WithValue(r.Context(), routedKey{}, rt)))
}

// forward sends a routed request: on the lean path when it came on it (lw
// is not nil), else with the ReverseProxy.
func (out *outbound) forward(rw *recorder, lw *l7.LeanWriter, r *http.Request) {
	if lw != nil {
		out.l.forwardLean(rw, lw, r, out.lean, out.RoundTrip)
		return
	}
	out.rp.ServeHTTP(rw, r)
}

// rewrite applies a URLRewrite filter to a copy of r (the original stays
// as the client sent it, for metrics and access logs).
func rewrite(r *http.Request, rw *route.URLRewrite) *http.Request {
	if rw == nil {
		return r
	}
	c := r.WithContext(r.Context())
	u := *r.URL
	c.URL = &u
	rw.Apply(c)
	return c
}

// resolveBackend finds the endpoints of a route's backend Service through
// its ClusterIP, as a connection to it would.
func (out *outbound) resolveBackend(b *route.Backend) (proxy.Destination, error) {
	t := out.o.Target
	port := b.Port
	if port == 0 {
		port = t.Port
	}
	if b.Service.Namespace == t.Namespace && b.Service.Name == t.Name && port == t.Port {
		return out.o.Dest, nil
	}
	svc := out.l.cfg.State().Service(b.Service.Namespace, b.Service.Name)
	if svc == nil || len(svc.ClusterIPs) == 0 {
		return proxy.Destination{}, errors.New("service " + b.Service.String() + " not found or headless")
	}
	return out.o.Resolve(netip.AddrPortFrom(svc.ClusterIPs[0], port))
}

// RoundTrip sends one request with the route's backend timeout and retry
// policy, to an endpoint picked per attempt.
func (out *outbound) RoundTrip(req *http.Request) (*http.Response, error) {
	rt, _ := req.Context().Value(routedKey{}).(*routed)
	if rt == nil {
		return nil, errors.New("request without a routing decision")
	}
	budget := out.l.budgets.For(rt.service)
	budget.Begin()
	defer budget.End()
	var pol *route.RetryPolicy
	var backendTimeout time.Duration
	if rt.rule != nil {
		pol, backendTimeout = rt.rule.Retry, rt.rule.BackendTimeout
	}
	var body []byte
	canRetry := pol != nil && pol.Attempts > 0
	if canRetry && req.Body != nil && req.Body != http.NoBody {
		b, err := io.ReadAll(io.LimitReader(req.Body, maxRetryBody+1))
		if err != nil {
			return nil, err
		}
		if len(b) > maxRetryBody {
			canRetry = false
			req.Body = struct {
				io.Reader
				io.Closer
			}{io.MultiReader(bytes.NewReader(b), req.Body), req.Body}
		} else {
			body = b
		}
	}
	return retryLoop(req.Context(), budget, pol, canRetry, func() (*http.Response, error) {
		return out.attempt(req, rt, body, canRetry, backendTimeout)
	})
}

// retryLoop makes the first try and the retries pol allows, under the
// destination's retry budget. A retry holds its place in the budget from
// the moment it is granted, through its backoff, until its attempt has
// returned; so at any moment the retries in flight to a destination are at
// most the budget's share of its requests in flight, and a destination
// that fails everything sees at most that much more load than without
// retries (TestRetryBudgetOutage).
func retryLoop(ctx context.Context, budget *retry.Budget, pol *route.RetryPolicy, canRetry bool,
	attempt func() (*http.Response, error)) (*http.Response, error) {
	held := func() {} // the budget place of the retry in progress
	defer func() { held() }()
	for n := 0; ; n++ {
		resp, err := attempt()
		held()
		held = func() {}
		retryable := err != nil && ctx.Err() == nil && !errors.Is(err, proxy.ErrDenied)
		if err == nil {
			retryable = pol.RetryOn(resp.StatusCode)
		}
		if !canRetry || !retryable || n >= pol.Attempts {
			return resp, err
		}
		rdone, ok := budget.Retry()
		if !ok {
			return resp, err
		}
		held = rdone
		if resp != nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		wait := retry.Backoff(pol.Backoff, n+1, rand.Int64N)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (out *outbound) attempt(req *http.Request, rt *routed, body []byte, replay bool, timeout time.Duration) (*http.Response, error) {
	ep, release := out.o.Pick(rt.dest.Endpoints)
	rt.ep, rt.picked = ep, true
	ctx := req.Context()
	if !rt.lean {
		// For the transport's dial.
		ctx = context.WithValue(ctx, endpointKey{}, endpointFor{service: rt.service, ep: ep})
	}
	cancel := context.CancelFunc(func() {})
	if timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, timeout)
	}
	// A shallow copy with its own URL: nothing below changes the header,
	// so the attempts can share the one ReverseProxy already copied.
	r := req.WithContext(ctx)
	u := *req.URL
	u.Host = ep.Addr.String()
	r.URL = &u
	if replay {
		if body != nil {
			r.Body = io.NopCloser(bytes.NewReader(body))
			r.ContentLength = int64(len(body))
		} else {
			r.Body = http.NoBody
		}
	}
	var resp *http.Response
	var err error
	if rt.lean {
		resp, err = out.lean.roundTrip(r, rt.service, ep)
	} else {
		resp, err = out.up.transport(req.ProtoMajor).RoundTrip(r)
	}
	if err != nil {
		cancel()
		release()
		return nil, err
	}
	resp.Body = &releaseBody{ReadCloser: resp.Body, cancel: cancel, release: release}
	return resp, nil
}

func (out *outbound) dial(ctx context.Context, _ string) (net.Conn, error) {
	e, ok := ctx.Value(endpointKey{}).(endpointFor)
	if !ok {
		return nil, errors.New("dial without an endpoint")
	}
	return out.o.Dial(ctx, e.service, e.ep)
}

// releaseBody is an attempt's response body: closing it (the first time)
// ends the attempt's context and its hold on the endpoint.
type releaseBody struct {
	io.ReadCloser
	released        atomic.Bool
	cancel, release func()
}

func (b *releaseBody) Close() error {
	err := b.ReadCloser.Close()
	if b.released.CompareAndSwap(false, true) {
		b.cancel()
		b.release()
	}
	return err
}

// reverseProxy forwards requests with net/http's ReverseProxy (hop-by-hop
// headers, trailers, upgrades, streaming). host, when set, names the
// address to connect to; otherwise RoundTrip sets it per attempt.
func (l *Layer) reverseProxy(up *upstream, host func(*http.Request) (string, bool)) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = "upstream"
			if host != nil {
				if h, ok := host(pr.In); ok {
					pr.Out.URL.Host = h
				}
			}
			pr.Out.Host = pr.In.Host
			// Rewrite drops the client's X-Forwarded-*; the mesh is not a
			// hop the application should see, so keep what the client sent.
			for _, k := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
				if v, ok := pr.In.Header[k]; ok {
					pr.Out.Header[k] = v
				}
			}
		},
		Transport:  up,
		BufferPool: &l.buffers,
		// Nothing is held back longer than flushInterval. ReverseProxy
		// itself flushes every write of a response without a length
		// (gRPC, streaming, server-sent events). A negative interval would
		// also flush each response's header in a goroutine of its own,
		// before the body: one write(2) more per request.
		FlushInterval:  flushInterval,
		ErrorLog:       nil,
		ErrorHandler:   l.proxyError,
		ModifyResponse: modifyResponse,
	}
}

// modifyResponse applies the route's response header modifiers.
func modifyResponse(resp *http.Response) error {
	if rt, _ := resp.Request.Context().Value(routedKey{}).(*routed); rt != nil && rt.rule != nil {
		rt.rule.ResponseHeaders.Apply(resp.Header)
		rt.backend.ResponseHeaders.Apply(resp.Header)
	}
	return nil
}

// flushInterval bounds how long the reverse proxies keep a response's
// header or body bytes before writing them to the client when its upstream
// pauses mid-response.
const flushInterval = time.Millisecond

// bufferPool lends the reverse proxies their body copy buffers, which
// they would otherwise allocate (32 KiB) for every response.
type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if bp, ok := b.p.Get().(*[]byte); ok {
		return *bp
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(buf []byte) { b.p.Put(&buf) }

// proxyError answers a request that got no response, with Envoy's texts.
func (l *Layer) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		setFlags(w, "UT")
		http.Error(w, "upstream request timeout", http.StatusGatewayTimeout)
	case errors.Is(err, proxy.ErrDenied):
		setFlags(w, "RBAC")
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusForbidden)
		_, _ = io.WriteString(w, authz.DeniedBody)
	case errors.Is(err, context.Canceled):
		// The client went away; nobody reads the answer.
		w.WriteHeader(499)
	default:
		l.log.Debug("request failed upstream", "error", err)
		setFlags(w, "UF")
		http.Error(w, "upstream connect error or disconnect/reset before headers", http.StatusServiceUnavailable)
	}
}

// upstream holds the transports of one client connection (HTTP/1.1 and
// HTTP/2 with prior knowledge, chosen by the request's protocol), so that
// upstream connections are reused between its requests; close closes every
// connection it dialled.
type upstream struct {
	dialFn func(ctx context.Context, addr string) (net.Conn, error)
	once1  sync.Once
	once2  sync.Once
	h1, h2 *http.Transport
	mu     sync.Mutex
	closed bool
	conns  map[*upConn]struct{}
}

func newUpstream(dial func(ctx context.Context, addr string) (net.Conn, error)) *upstream {
	return &upstream{dialFn: dial, conns: map[*upConn]struct{}{}}
}

type upConn struct {
	net.Conn
	u    *upstream
	once sync.Once
}

func (c *upConn) Close() error {
	c.once.Do(func() {
		c.u.mu.Lock()
		delete(c.u.conns, c)
		c.u.mu.Unlock()
	})
	return c.Conn.Close()
}

var errUpstreamClosed = errors.New("the client connection is closed")

func (u *upstream) dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := u.dialFn(ctx, addr)
	if err != nil {
		return nil, err
	}
	uc := &upConn{Conn: c, u: u}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		c.Close()
		return nil, errUpstreamClosed
	}
	u.conns[uc] = struct{}{}
	return uc, nil
}

func (u *upstream) newTransport(h2 bool) *http.Transport {
	t := &http.Transport{
		DialContext:         func(ctx context.Context, _, addr string) (net.Conn, error) { return u.dial(ctx, addr) },
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		Protocols:           new(http.Protocols),
	}
	if h2 {
		t.Protocols.SetUnencryptedHTTP2(true)
	} else {
		t.Protocols.SetHTTP1(true)
	}
	return t
}

func (u *upstream) transport(protoMajor int) *http.Transport {
	if protoMajor == 2 {
		u.once2.Do(func() { u.h2 = u.newTransport(true) })
		return u.h2
	}
	u.once1.Do(func() { u.h1 = u.newTransport(false) })
	return u.h1
}

// RoundTrip makes upstream an http.RoundTripper for the inbound side.
func (u *upstream) RoundTrip(r *http.Request) (*http.Response, error) {
	return u.transport(r.ProtoMajor).RoundTrip(r)
}

func (u *upstream) close() {
	u.once1.Do(func() {})
	u.once2.Do(func() {})
	for _, t := range []*http.Transport{u.h1, u.h2} {
		if t != nil {
			t.CloseIdleConnections()
		}
	}
	u.mu.Lock()
	u.closed = true
	conns := make([]*upConn, 0, len(u.conns))
	for c := range u.conns {
		conns = append(conns, c)
	}
	u.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// counted lets the connection's owner wait for handlers still running
// after the server closed.
func counted(wg *sync.WaitGroup, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wg.Add(1)
		defer wg.Done()
		h.ServeHTTP(w, r)
	})
}
