package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/enforce"
	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/explain"
	"github.com/nodemesh/nodemesh/agent/policy/fromstate"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
	identityk8s "github.com/nodemesh/nodemesh/identity/k8s"
	"github.com/nodemesh/nodemesh/identity/svid"
	"github.com/nodemesh/nodemesh/redirect"
)

// Capture statuses, as shown by the config dump and nodemesh_capture_status.
const (
	captureEnrolled = "enrolled" // captured, self-check not passed yet
	captureVerified = "verified" // the self-check proved capture works
	captureFailed   = "failed"
)

// dataplane wires the cluster state to capture, SVIDs, policy and the
// proxy: it enrolls the enrolled pods of this node, serves their in-pod
// listeners, and keeps policy current.
type dataplane struct {
	a        *agent
	log      *slog.Logger
	node     string
	capture  *redirect.Capture
	svids    *svid.Manager
	ca       *svid.Client
	tls      hbone.SPIFFETLS
	pol      atomic.Pointer[policy.Snapshot]
	enforcer *enforce.Policy // the proxies' Policy, over pol

	ctx    context.Context // parent of the pods' serving contexts
	cancel context.CancelFunc

	// podNetns is Config.PodNetns; sandboxes finds pods' namespaces in
	// /proc (nil with --pod-netns=annotations).
	podNetns  string
	sandboxes sandboxScanner
	// located caches the sandboxes found in /proc by pod UID, so /proc is
	// walked only for new pods or changed sandboxes; alive checks an entry
	// (stillThere; tests replace it). Both are used by the reconcile loop only.
	located map[string]nodeinfo.Sandbox
	alive   func(nodeinfo.Sandbox) bool

	mu      sync.Mutex
	pods    map[state.Key]*localPod
	retired hbone.PoolStats // counters of the pools of pods gone, so totals stay monotonic
	wg      sync.WaitGroup  // retiring pods' drains
}

// localPod is an enrolled pod of this node.
//
// Each pod has its own proxy and HBONE pool: tunnels are dialled from
// inside the pod's network namespace (as ztunnel does in-pod), so the
// destination sees the source pod's IP as the TCP peer, and NetworkPolicy
// at the destination matches the real source. Pooling is therefore per
// (source pod, destination identity, destination IP).
type localPod struct {
	pod   *state.Pod
	ep    *redirect.EnrolledPod
	w     *proxy.Workload
	pool  *hbone.Pool
	proxy *proxy.Proxy
	ctx   context.Context // serving context, ended by cancel
	// excluded and excludedIn are the outbound and inbound ports capture
	// currently leaves alone (pod keeps the values at enrollment; capture
	// updates these in place).
	excluded, excludedIn []uint16
	cancel               context.CancelFunc
	done                 sync.WaitGroup
	dsts                 sync.Map // *net.TCPConn -> netip.AddrPort, from AcceptOutbound to the proxy

	status  string // guarded by dataplane.mu
	problem string
}

func newDataplane(ctx context.Context, a *agent) (_ *dataplane, err error) {
	cfg := a.cfg
	log := a.log.With("component", "dataplane")
	// Refuse a node that cannot capture, listing everything to fix at once.
	// Finding pods through /proc needs the host's PID namespace, and pins
	// on a bpffs that outlives the agent's container.
	pcfg := nodeinfo.PreflightConfig{PinDir: cfg.BPFPinDir}
	if cfg.PodNetns == podNetnsProc {
		pcfg.RequireBPFFS, pcfg.RequireHostPID = true, true
	}
	node, report, err := nodeinfo.DiscoverNode(pcfg)
	for _, r := range report.Results {
		log.Debug("preflight", "check", r.Name, "ok", r.Err == nil)
	}
	if err != nil {
		return nil, err
	}
	root := cfg.CgroupRoot
	if root == "" {
		if report.Hierarchy.Path == "" {
			return nil, errors.New("finding the cgroup root for capture: no cgroup v2 hierarchy (pass --cgroup-root)")
		}
		root = report.Hierarchy.Path
	}
	dp := &dataplane{a: a, log: log, node: cfg.NodeName, pods: make(map[state.Key]*localPod), podNetns: cfg.PodNetns, alive: stillThere}
	if cfg.PodNetns != podNetnsAnnotations {
		dp.sandboxes = node.Scanner
	}
	var cleanup []func()
	defer func() {
		if err != nil {
			for i := len(cleanup) - 1; i >= 0; i-- {
				cleanup[i]()
			}
		}
	}()
	dp.capture, err = redirect.Load(ctx, redirect.Config{CgroupRoot: root, PinDir: cfg.BPFPinDir, Logger: log.With("component", "capture")})
	if err != nil {
		return nil, fmt.Errorf("loading capture at cgroup %s: %w", root, err)
	}
	cleanup = append(cleanup, func() { _ = dp.capture.Release() })
	dp.svids, dp.ca, err = svid.NewWithCA(svid.Config{TrustDomain: cfg.td, Log: log.With("component", "svid")},
		svid.ClientConfig{URL: cfg.CAAddr, CAID: cfg.caID, Token: svid.FileToken(cfg.CATokenFile)})
	if err != nil {
		return nil, fmt.Errorf("creating the SVID manager: %w", err)
	}
	cleanup = append(cleanup, dp.ca.Close)
	// Capture state (acceleration, per-pod verification, program counters)
	// and SVID/root expiry, for the shipped dashboard and alerts.
	for _, c := range []prometheus.Collector{dp.capture.Collector(), dp.svids.Collector()} {
		if err := a.reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering capture and SVID metrics: %w", err)
		}
	}
	dp.tls = hbone.SPIFFETLS{
		SVID:    func(id spiffeid.ID) (x509svid.Source, error) { return dp.svids.SVIDSource(id), nil },
		Bundles: dp.svids,
	}
	engine, err := policy.NewEngine(8192)
	if err != nil {
		return nil, fmt.Errorf("creating the policy engine: %w", err)
	}
	if dp.enforcer, err = enforce.New(enforce.Config{Snapshot: dp.pol.Load, Engine: engine, Log: log.With("component", "policy")}); err != nil {
		return nil, err
	}
	dp.ctx, dp.cancel = context.WithCancel(context.Background())

	a.metrics.SetPoolStats(func() admin.PoolStats {
		s := dp.poolStats()
		return admin.PoolStats{Hits: s.Hits, Misses: s.Misses, Handshakes: s.Handshakes, HandshakeErrors: s.HandshakeErrors, Conns: s.Conns, Streams: s.Streams}
	})
	a.admin.AddDump("certificates", dp.certificates)
	a.admin.AddDump("pools", dp.poolsDump)
	a.admin.AddDump("capture", dp.captureDump)
	a.admin.SetConnections(dp.connections)
	// Live `nodemeshctl policy explain --agent`: decisions on the snapshot
	// this agent enforces.
	a.admin.Handle(explain.Path, explain.Handler(func() *policy.Snapshot {
		if ps := dp.pol.Load(); ps != nil {
			return ps
		}
		return policy.NewSnapshot(0, policy.Input{}, policy.Options{TrustDomain: cfg.td.Name()})
	}))
	a.admin.AddReadiness("svids", dp.svidsReady)
	a.admin.AddReadiness("capture", dp.captureReady)
	return dp, nil
}

// run keeps the data plane in step with the cluster state until ctx ends.
func (dp *dataplane) run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	errc := make(chan error, 2)
	wg.Go(func() {
		if err := dp.svids.Run(ctx); err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("SVID manager: %w", err)
		}
	})
	wg.Go(func() {
		if err := identityk8s.RunBundleWatcher(ctx, dp.a.client, dp.a.cfg.bundleNS, dp.a.cfg.bundleName, dp.svids.SetBundle, dp.log); err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("trust bundle watcher: %w", err)
		}
	})

	ch, unsub := dp.a.store.Subscribe()
	defer unsub()
	var applied, policyVersion uint64
	first := true
	for {
		snap := dp.a.store.Snapshot()
		if snap.Synced() && snap.Version() != applied {
			if snap.Version() != policyVersion {
				dp.updatePolicy(ctx, snap, first)
				policyVersion = snap.Version()
			}
			dp.reconcile(ctx, snap)
			dp.dropAdopted(snap)
			first = false
			applied = snap.Version()
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-ch:
		case <-time.After(10 * time.Second):
			// Retry pods whose enrollment failed.
			applied = 0
		}
	}
}

func (dp *dataplane) updatePolicy(ctx context.Context, snap *state.Snapshot, first bool) {
	ps, errs := fromstate.Snapshot(snap, "")
	for _, err := range errs {
		dp.log.Warn("policy object unreadable; enforced fail closed for its namespace", "err", err)
	}
	old := dp.pol.Swap(ps)
	if !first && old != nil {
		n := 0
		for _, lp := range dp.served() {
			n += lp.proxy.Reevaluate(ctx)
		}
		if n > 0 {
			dp.log.Info("closed connections denied by the new policy", "connections", n)
		}
	}
}

// wanted reports whether the agent should capture p.
func (dp *dataplane) wanted(p *state.Pod) bool {
	return p.Enrolled && p.Live() && len(p.IPs) > 0 && p.Netns != "" && !p.Identity.IsZero() && dp.servesPod(p)
}

func (dp *dataplane) reconcile(ctx context.Context, snap *state.Snapshot) {
	want := make(map[state.Key]*state.Pod)
	scan := dp.scanOnce()
	seen := make(map[string]bool)
	for _, p := range snap.PodsOnNode(dp.node) {
		seen[p.UID] = true
		p = dp.locate(p, scan)
		if dp.wanted(p) {
			want[p.Key()] = p
		} else if p.Enrolled && p.Live() && p.Netns == "" {
			dp.log.Debug("enrolled pod without a network namespace yet", "pod", p.Key().String())
		}
	}
	dp.forgetLocated(seen)
	dp.mu.Lock()
	var stop []*localPod
	for k, lp := range dp.pods {
		if p, ok := want[k]; !ok || p.UID != lp.pod.UID || p.Netns != lp.pod.Netns || !slices.Equal(p.IPs, lp.pod.IPs) {
			stop = append(stop, lp)
			delete(dp.pods, k)
		}
	}
	dp.mu.Unlock()
	for _, lp := range stop {
		dp.unenroll(lp)
	}
	for k, p := range want {
		dp.mu.Lock()
		lp := dp.pods[k]
		failed := lp != nil && lp.status == captureFailed
		dp.mu.Unlock()
		switch {
		case lp == nil:
			dp.enroll(ctx, p)
		case failed && lp.ep == nil:
			// Enrollment itself failed: nothing of ours to keep; try again.
			dp.unenroll(lp)
			dp.mu.Lock()
			delete(dp.pods, k)
			dp.mu.Unlock()
			dp.enroll(ctx, p)
		case failed:
			// Captured, but the self-check failed: check again. The pod
			// stays captured meanwhile (never a window of plain networking).
			dp.setStatus(lp, captureEnrolled, "")
			lp.done.Go(func() { dp.selfCheck(lp.ctx, lp, dp.log.With("pod", k.String())) })
		case !slices.Equal(lp.excluded, p.ExcludeOutboundPorts) || !slices.Equal(lp.excludedIn, p.ExcludeInboundPorts):
			// Updated in place by capture, without uncapturing the pod.
			if _, err := dp.capture.Enroll(ctx, redirect.Pod{Name: k.String(), Netns: p.Netns, Cgroup: p.Cgroup,
				IPs: p.IPs, ExcludeOutboundPorts: p.ExcludeOutboundPorts, ExcludeInboundPorts: p.ExcludeInboundPorts}); err != nil {
				dp.log.Error("updating the pod's excluded ports", "pod", k.String(), "err", err)
				continue
			}
			// Only the reconcile loop reads them.
			lp.excluded, lp.excludedIn = p.ExcludeOutboundPorts, p.ExcludeInboundPorts
		}
	}
}

func owner(p *state.Pod) string {
	if p.UID != "" {
		return p.UID
	}
	return p.Key().String()
}

func (dp *dataplane) setStatus(lp *localPod, status, problem string) {
	dp.mu.Lock()
	lp.status, lp.problem = status, problem
	dp.mu.Unlock()
	dp.a.metrics.SetCaptureStatus(lp.pod.Namespace, lp.pod.Name, status)
}

func (dp *dataplane) enroll(ctx context.Context, p *state.Pod) {
	log := dp.log.With("pod", p.Key().String())
	lp := &localPod{pod: p, excluded: p.ExcludeOutboundPorts, excludedIn: p.ExcludeInboundPorts, w: &proxy.Workload{Namespace: p.Namespace, Name: p.Name, Identity: p.Identity, IPs: p.IPs}}
	dp.mu.Lock()
	dp.pods[p.Key()] = lp
	dp.mu.Unlock()
	if err := dp.svids.Add(owner(p), p.Identity); err != nil {
		log.Error("requesting the pod's SVID", "spiffe_id", p.Identity.String(), "err", err)
		dp.setStatus(lp, captureFailed, err.Error())
		return
	}
	ep, err := dp.capture.Enroll(ctx, redirect.Pod{Name: p.Key().String(), Netns: p.Netns, Cgroup: p.Cgroup,
		IPs: p.IPs, ExcludeOutboundPorts: p.ExcludeOutboundPorts, ExcludeInboundPorts: p.ExcludeInboundPorts})
	if err != nil {
		// Retried on the next change or after 10 s; the pod keeps
		// whatever capture it had (none, or pinned and failing closed).
		log.Error("enrolling the pod in capture", "err", err)
		dp.setStatus(lp, captureFailed, err.Error())
		return
	}
	lp.ep = ep
	mark := dp.capture.Mark()
	dial := &inpod.Dialer{Netns: p.Netns, Mark: mark}
	lp.pool, err = hbone.NewPool(hbone.PoolConfig{TLS: dp.tls, Logger: log.With("component", "pool"),
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return c, nil
		}})
	if err == nil {
		lp.proxy, err = proxy.New(proxy.Config{
			Logger: log.With("component", "proxy"), Resolver: dp, Pool: lp.pool, ServerTLS: dp.tls,
			Dialer: podDialer{dial}, Policy: dp.enforcer, Observer: observer{dp},
		})
	}
	if err != nil {
		log.Error("creating the pod's proxy", "err", err)
		if lp.pool != nil {
			_ = lp.pool.Close()
			lp.pool = nil
		}
		_ = dp.capture.Unenroll(ep)
		lp.ep = nil
		dp.setStatus(lp, captureFailed, err.Error())
		return
	}
	pctx, cancel := context.WithCancel(dp.ctx)
	lp.ctx, lp.cancel = pctx, cancel
	serve := func(what string, f func() error) {
		lp.done.Go(func() {
			if err := f(); err != nil && pctx.Err() == nil && !errors.Is(err, proxy.ErrStopped) && !errors.Is(err, net.ErrClosed) {
				log.Warn("in-pod listener stopped", "listener", what, "err", err)
			}
		})
	}
	for _, ln := range ep.Listeners.Outbound {
		serve("outbound", func() error {
			return lp.proxy.ServeOutbound(pctx, &outboundListener{TCPListener: ln, lp: lp}, lp.w, lp.origDst)
		})
	}
	for _, ln := range ep.Listeners.Inbound {
		serve("inbound", func() error { return lp.proxy.ServeInboundPlaintext(pctx, ln, lp.w, nil) })
	}
	for _, ln := range ep.Listeners.HBONE {
		serve("hbone", func() error { return lp.proxy.ServeInboundHBONE(pctx, ln, lp.w) })
	}
	dp.setStatus(lp, captureEnrolled, "")
	lp.done.Go(func() { dp.selfCheck(pctx, lp, log) })
	log.Info("pod enrolled", "spiffe_id", p.Identity.String(), "ips", fmt.Sprint(p.IPs))
}

// selfCheck proves capture works for the pod, retrying for a while (the
// accept loops may not have started yet).
func (dp *dataplane) selfCheck(ctx context.Context, lp *localPod, log *slog.Logger) {
	var err error
	for attempt := range 10 {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = lp.ep.SelfCheck(cctx)
		cancel()
		if err == nil {
			dp.setStatus(lp, captureVerified, "")
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		}
	}
	log.Error("capture self-check failed", "err", err)
	dp.setStatus(lp, captureFailed, err.Error())
}

func (dp *dataplane) unenroll(lp *localPod) {
	// Capture first: it takes the listeners out of its maps before closing
	// them (a listener closed earlier has already left the sockmap, and
	// deleting its slot then fails with EINVAL).
	if lp.ep != nil {
		if err := dp.capture.Unenroll(lp.ep); err != nil {
			dp.log.Warn("unenrolling a pod", "pod", lp.pod.Key().String(), "err", err)
		}
	}
	if lp.cancel != nil {
		lp.cancel()
	}
	lp.done.Wait()
	if lp.proxy != nil {
		// Connections already open may finish (up to the drain deadline);
		// the SVID stays until then, since they still present it.
		dp.wg.Go(func() {
			ctx, cancel := context.WithTimeout(dp.ctx, dp.a.cfg.DrainDeadline)
			_ = lp.proxy.Drain(ctx)
			cancel()
			dp.retire(lp)
			dp.svids.Remove(owner(lp.pod))
		})
	} else {
		dp.svids.Remove(owner(lp.pod))
	}
	dp.a.metrics.SetCaptureStatus(lp.pod.Namespace, lp.pod.Name, "")
	dp.log.Info("pod unenrolled", "pod", lp.pod.Key().String())
}

// dropAdopted unenrolls pods a previous agent left captured that are no
// longer enrolled pods of this node (after reconcile re-enrolled the
// others); it runs after every reconcile. A pod that should be enrolled but failed to re-enroll stays
// captured (failing closed) for the retry, never released to plaintext.
func (dp *dataplane) dropAdopted(snap *state.Snapshot) {
	wanted := make(map[netip.Addr]bool)
	for _, p := range snap.PodsOnNode(dp.node) {
		if dp.wanted(p) {
			for _, ip := range p.IPs {
				wanted[ip] = true
			}
		}
	}
	for _, p := range dp.capture.AdoptedPods() {
		if slices.ContainsFunc(p.IPs, func(ip netip.Addr) bool { return wanted[ip.Unmap()] }) {
			dp.log.Warn("a pod left captured by the previous agent is not re-enrolled yet; it stays captured (failing closed) until it is", "ips", fmt.Sprint(p.IPs))
			continue
		}
		if err := dp.capture.UnenrollCookie(p.Cookie); err != nil {
			dp.log.Warn("releasing a pod left captured by a previous agent", "ips", fmt.Sprint(p.IPs), "err", err)
			continue
		}
		dp.log.Info("released a pod left captured by a previous agent", "ips", fmt.Sprint(p.IPs))
	}
}

// served returns the pods with a running proxy.
func (dp *dataplane) served() []*localPod {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	out := make([]*localPod, 0, len(dp.pods))
	for _, lp := range dp.pods {
		if lp.proxy != nil {
			out = append(out, lp)
		}
	}
	return out
}

// retire closes a pod's proxy and pool and keeps its pool counters.
func (dp *dataplane) retire(lp *localPod) {
	_ = lp.proxy.Close()
	st := lp.pool.Stats()
	_ = lp.pool.Close()
	dp.mu.Lock()
	dp.retired.Hits += st.Hits
	dp.retired.Misses += st.Misses
	dp.retired.Handshakes += st.Handshakes
	dp.retired.HandshakeErrors += st.HandshakeErrors
	dp.mu.Unlock()
}

func (dp *dataplane) poolStats() hbone.PoolStats {
	dp.mu.Lock()
	total := dp.retired
	dp.mu.Unlock()
	for _, lp := range dp.served() {
		s := lp.pool.Stats()
		total.Hits += s.Hits
		total.Misses += s.Misses
		total.Handshakes += s.Handshakes
		total.HandshakeErrors += s.HandshakeErrors
		total.Conns += s.Conns
		total.Streams += s.Streams
	}
	return total
}

func (dp *dataplane) poolsDump() any {
	out := map[string]any{"total": dp.poolStats()}
	pods := map[string]hbone.PoolStats{}
	for _, lp := range dp.served() {
		pods[lp.pod.Key().String()] = lp.pool.Stats()
	}
	out["pods"] = pods
	return out
}

// drain drains every pod's proxy in parallel until ctx ends.
func (dp *dataplane) drain(ctx context.Context) error {
	var wg sync.WaitGroup
	pods := dp.served()
	errs := make(chan error, len(pods))
	for _, lp := range pods {
		wg.Go(func() {
			if err := lp.proxy.Drain(ctx); err != nil {
				errs <- fmt.Errorf("pod %s: %w", lp.pod.Key(), err)
			}
		})
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return errors.Join(all...)
}

// close stops serving, leaving capture pinned (Release) so enrolled pods
// fail closed until the next agent adopts them.
func (dp *dataplane) close() error {
	dp.cancel()
	dp.mu.Lock()
	pods := make([]*localPod, 0, len(dp.pods))
	for _, lp := range dp.pods {
		pods = append(pods, lp)
	}
	dp.mu.Unlock()
	var errs []error
	for _, lp := range pods {
		if lp.proxy != nil {
			errs = append(errs, lp.proxy.Close())
		}
		lp.done.Wait()
		if lp.pool != nil {
			errs = append(errs, lp.pool.Close())
		}
	}
	dp.wg.Wait() // pods being retired: their proxies close at once now
	errs = append(errs, dp.capture.Release())
	dp.ca.Close()
	return errors.Join(errs...)
}

// outboundListener hands the proxy captured connections: AcceptOutbound
// answers capture self-check probes and recovers each original
// destination, which lp.origDst then returns. The connection itself stays a
// *net.TCPConn so the proxy's splice path applies.
type outboundListener struct {
	*net.TCPListener
	lp *localPod
}

func (l *outboundListener) Accept() (net.Conn, error) {
	c, dst, err := l.lp.ep.AcceptOutbound(l.TCPListener)
	if err != nil {
		return nil, err
	}
	l.lp.dsts.Store(c, dst)
	return c, nil
}

func (lp *localPod) origDst(c net.Conn) (netip.AddrPort, error) {
	tc, ok := c.(*net.TCPConn)
	if ok {
		if v, ok := lp.dsts.LoadAndDelete(tc); ok {
			return v.(netip.AddrPort), nil
		}
	}
	return netip.AddrPort{}, fmt.Errorf("no original destination recorded for %s", c.RemoteAddr())
}

// Resolve implements proxy.Resolver from the current cluster state. An
// enrolled destination is reached over HBONE only while its node's agent
// is mesh-capable (agent/rollout); a STRICT one whose node has none is
// refused, with the reason logged.
func (dp *dataplane) Resolve(src *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
	snap := dp.a.store.Snapshot()
	if svc, port, ok := snap.ServiceByVIP(dst); ok {
		bs := snap.Backends(svc, port)
		if len(bs) == 0 {
			return proxy.Destination{}, fmt.Errorf("service %s port %d: %w", svc.Key(), port.Port, proxy.ErrNoEndpoints)
		}
		d := proxy.Destination{Service: svc.Key().String(), Endpoints: make([]proxy.Endpoint, 0, len(bs))}
		var refused error
		for _, b := range bs {
			ep, err := meshEndpoint(b.Addr, b.Pod, dp.a.meshCapable, dp.strictDst)
			if err != nil {
				refused = err
				continue
			}
			d.Endpoints = append(d.Endpoints, ep)
		}
		if len(d.Endpoints) == 0 {
			dp.log.Warn("refusing outbound connection", "pod", src.String(), "dst", dst.String(), "service", d.Service, "reason", refused)
			return proxy.Destination{Service: d.Service}, fmt.Errorf("service %s port %d: %w", svc.Key(), port.Port, refused)
		}
		return d, nil
	}
	ep, err := meshEndpoint(dst, snap.PodByIP(dst.Addr()), dp.a.meshCapable, dp.strictDst)
	if err != nil {
		dp.log.Warn("refusing outbound connection", "pod", src.String(), "dst", dst.String(), "reason", err)
		return proxy.Destination{}, err
	}
	return proxy.Destination{Endpoints: []proxy.Endpoint{ep}}, nil
}

// strictDst reports whether pod ("namespace/name") requires mTLS on port;
// unknown, or no policy yet, is STRICT (fail closed).
func (dp *dataplane) strictDst(pod string, port uint16) bool {
	ps := dp.pol.Load()
	if ps == nil {
		return true
	}
	m, _, ok := ps.MTLSMode(pod, port)
	return !ok || m == v1alpha1.MTLSStrict
}

// podDialer dials for a pod's proxy from inside the pod's network
// namespace (passthrough keeps the pod's source IP; inbound delivery
// reaches the app as the pod itself), with the capture bypass mark.
type podDialer struct{ d *inpod.Dialer }

func (p podDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := p.d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// certDump is one SVID in the config dump.
type certDump struct {
	SPIFFEID  string    `json:"spiffeId"`
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	Serial    string    `json:"serial,omitempty"`
	Error     string    `json:"error,omitempty"`
}

func (dp *dataplane) certificates() any {
	out := []certDump{}
	for _, id := range dp.svids.IDs() {
		c := certDump{SPIFFEID: id.String()}
		s, err := dp.svids.SVIDSource(id).GetX509SVID()
		if err != nil {
			c.Error = err.Error()
		} else if len(s.Certificates) > 0 {
			c.NotBefore, c.NotAfter = s.Certificates[0].NotBefore, s.Certificates[0].NotAfter
			c.Serial = s.Certificates[0].SerialNumber.Text(16)
		}
		out = append(out, c)
	}
	return out
}

type capturePodDump struct {
	Pod      string   `json:"pod"`
	SPIFFEID string   `json:"spiffeId"`
	IPs      []string `json:"ips"`
	Netns    string   `json:"netns"`
	Status   string   `json:"status"`
	Problem  string   `json:"problem,omitempty"`
}

func (dp *dataplane) captureDump() any {
	on, why := dp.capture.Accel()
	dp.mu.Lock()
	pods := []capturePodDump{}
	for _, lp := range dp.pods {
		d := capturePodDump{Pod: lp.pod.Key().String(), SPIFFEID: lp.pod.Identity.String(), Netns: lp.pod.Netns,
			Status: lp.status, Problem: lp.problem}
		for _, ip := range lp.pod.IPs {
			d.IPs = append(d.IPs, ip.String())
		}
		pods = append(pods, d)
	}
	dp.mu.Unlock()
	slices.SortFunc(pods, func(a, b capturePodDump) int { return strings.Compare(a.Pod, b.Pod) })
	return map[string]any{"pods": pods, "adopted": dp.capture.Adopted(), "acceleration": on, "accelerationReason": why}
}

// connDump is one open connection in /connections.
type connDump struct {
	ID          uint64    `json:"id"`
	Direction   string    `json:"direction"`
	Transport   string    `json:"transport"`
	Pod         string    `json:"pod"`
	Src         string    `json:"src"`
	SrcIdentity string    `json:"srcIdentity,omitempty"`
	OrigDst     string    `json:"origDst,omitempty"`
	Dst         string    `json:"dst"`
	DstIdentity string    `json:"dstIdentity,omitempty"`
	DstWorkload string    `json:"dstWorkload,omitempty"`
	Service     string    `json:"service,omitempty"`
	Start       time.Time `json:"start"`
	Sent        int64     `json:"bytesSent"`
	Received    int64     `json:"bytesReceived"`
}

func (dp *dataplane) connections() any {
	var infos []proxy.ConnInfo
	for _, lp := range dp.served() {
		infos = append(infos, lp.proxy.Connections()...)
	}
	out := make([]connDump, 0, len(infos))
	for _, c := range infos {
		f := c.Flow
		d := connDump{ID: c.ID, Direction: f.Direction.String(), Transport: f.Transport.String(), Src: f.Src.String(),
			Dst: f.Dst.String(), DstWorkload: f.DstWorkload, Service: f.Service, Start: c.Start, Sent: c.Sent, Received: c.Received}
		if f.Workload != nil {
			d.Pod = f.Workload.String()
		}
		if f.OrigDst.IsValid() {
			d.OrigDst = f.OrigDst.String()
		}
		if !f.SrcIdentity.IsZero() {
			d.SrcIdentity = f.SrcIdentity.String()
		}
		if !f.DstIdentity.IsZero() {
			d.DstIdentity = f.DstIdentity.String()
		}
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b connDump) int { return cmp.Or(strings.Compare(a.Pod, b.Pod), cmp.Compare(a.ID, b.ID)) })
	return out
}

func (dp *dataplane) svidsReady(context.Context) error {
	var missing []string
	for _, id := range dp.svids.IDs() {
		if _, err := dp.svids.SVIDSource(id).GetX509SVID(); err != nil {
			missing = append(missing, id.String())
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("no SVID yet for %s (is the CA at %s reachable?)", strings.Join(missing, ", "), dp.a.cfg.CAAddr)
	}
	return nil
}

func (dp *dataplane) captureReady(context.Context) error {
	if !dp.a.store.Snapshot().Synced() {
		return errors.New("waiting for cluster state to enroll pods")
	}
	dp.mu.Lock()
	defer dp.mu.Unlock()
	var bad []string
	for _, lp := range dp.pods {
		if lp.status != captureVerified {
			s := lp.pod.Key().String() + " (" + lp.status
			if lp.problem != "" {
				s += ": " + lp.problem
			}
			bad = append(bad, s+")")
		}
	}
	slices.Sort(bad)
	if len(bad) > 0 {
		return fmt.Errorf("capture not verified for %s", strings.Join(bad, ", "))
	}
	return nil
}

// observer feeds the proxy's connection events to metrics and the access
// log.
type observer struct{ dp *dataplane }

func (o observer) Opened(c *proxy.ConnInfo) {
	m := o.dp.metrics(c.Flow, c.Start)
	o.dp.a.metrics.Opened(m)
	o.dp.a.metrics.Setup(c.Flow.Direction.String(), "ok", c.Setup)
}

func (o observer) Closed(c *proxy.ConnInfo, reason string) {
	o.dp.a.metrics.Closed(o.dp.metrics(c.Flow, c.Start), c.Sent, c.Received, reason)
	o.dp.recordExposure(c)
}

func (o observer) Refused(f *proxy.Flow, r *proxy.Refusal) {
	c := o.dp.metrics(*f, time.Time{})
	if r.Reason.Failure() {
		o.dp.a.metrics.Failed(c, r.Reason.String(), r.Setup, r.Detail)
		return
	}
	o.dp.a.metrics.Refused(c, deniedLabel(r.Reason), r.Detail)
}

// deniedLabel is the nodemesh_connections_denied_total reason of a
// refusal (docs/operations.md).
func deniedLabel(r proxy.RefusalReason) string {
	if r == proxy.RefusedInvalid {
		return "error"
	}
	return r.String()
}

func splitKey(s string) (ns, name string) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		return "", s
	}
	return ns, name
}

func (dp *dataplane) metrics(f proxy.Flow, start time.Time) *admin.Conn {
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
	snap := dp.a.store.Snapshot()
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
