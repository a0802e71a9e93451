package node

import (
	"context"
	"crypto/x509"
	"encoding/hex"
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

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/dataplane"
	"github.com/nodemesh/nodemesh/agent/enforce"
	l7mesh "github.com/nodemesh/nodemesh/agent/l7/mesh"
	"github.com/nodemesh/nodemesh/agent/l7/resilience"
	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/l7/tracing"
	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/explain"
	"github.com/nodemesh/nodemesh/agent/policy/fromstate"
	"github.com/nodemesh/nodemesh/agent/resolve"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
	"github.com/nodemesh/nodemesh/agent/workloads"
	identityk8s "github.com/nodemesh/nodemesh/identity/k8s"
	"github.com/nodemesh/nodemesh/identity/svid"
	"github.com/nodemesh/nodemesh/identity/workload"
	"github.com/nodemesh/nodemesh/redirect"
)

// mesh wires the cluster state to capture, SVIDs, policy and the per-pod
// data plane, and keeps them in step (run).
type mesh struct {
	n       *Node
	log     *slog.Logger
	capture *redirect.Capture
	// svids is the identity source: the nodemesh CA's SVID manager or the
	// SPIFFE Workload API (cfg.IdentitySource).
	svids svidSource
	// ca and setBundle are the CA's client and the manager's bundle input
	// (nil with the Workload API, which brings its own bundle).
	ca        *svid.Client
	setBundle func([]*x509.Certificate) error
	// svidHint ends the readiness error for a missing SVID: what to check.
	svidHint string
	pol      atomic.Pointer[policy.Snapshot] // the snapshot enforced
	// polBuilder builds pol from each state version, reusing what the
	// change did not touch; only run's goroutine uses it.
	polBuilder *fromstate.Builder
	dp         *dataplane.Dataplane
	// l7 is the optional HTTP layer; its index of claimed inbound ports is
	// refreshed here on every state change, off the connection path.
	l7 *l7mesh.Layer
	// obs labels the connections' metrics; its index of the Services of
	// inbound connections is refreshed here too.
	obs *telemetry.Observer
	// tracer exports the L7 path\'s spans (nil: tracing off).
	tracer  *tracing.Tracer
	filter  workloads.Filter
	locator *workloads.Locator
	// pending schedules retries of the pods not captured yet; failed
	// wakes run when a pod's capture fails outside a reconcile (its
	// self-check).
	pending *pendingPods
	failed  chan struct{}
	// reported are the sandboxes the CNI plugin handed over (agent/cni);
	// cniWake asks run for a reconcile when one arrives or leaves.
	reported *workloads.Reported
	cniWake  chan struct{}
}

// svidSource is what the mesh needs of an identity source: the data
// plane's SVIDs, the identities wanted (for the certificates dump and
// readiness), expiry metrics, and its loop.
type svidSource interface {
	dataplane.SVIDs
	IDs() []spiffeid.ID
	Collector() prometheus.Collector
	Run(ctx context.Context) error
}

func (n *Node) newMesh(ctx context.Context) (_ *mesh, err error) {
	cfg := n.cfg
	log := n.log.With("component", "dataplane")
	m := &mesh{n: n, log: log, filter: workloads.Filter{Node: cfg.NodeName, Only: cfg.OnlyPods},
		pending: newPendingPods(log), failed: make(chan struct{}, 1),
		reported: workloads.NewReported(cfg.DrainDeadline), cniWake: make(chan struct{}, 1)}
	var cleanup []func()
	defer func() {
		if err != nil {
			for i := len(cleanup) - 1; i >= 0; i-- {
				cleanup[i]()
			}
		}
	}()
	// The identity source first: a missing SPIRE socket is reported before
	// anything touches the kernel.
	if err := m.newSVIDSource(ctx); err != nil {
		return nil, err
	}
	if m.ca != nil {
		cleanup = append(cleanup, m.ca.Close)
	}
	if src, ok := m.svids.(*workload.Source); ok {
		cleanup = append(cleanup, src.Close)
	}
	// Refuse a node that cannot capture, listing everything to fix at once.
	// Finding pods through /proc needs the host's PID namespace, and pins
	// on a bpffs that outlives the agent's container.
	pcfg := nodeinfo.PreflightConfig{PinDir: cfg.BPFPinDir}
	if cfg.PodNetns == workloads.NetnsProc {
		pcfg.RequireBPFFS, pcfg.RequireHostPID = true, true
	}
	host, report, err := nodeinfo.DiscoverNode(pcfg)
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
	var scanner workloads.Scanner
	if host.Scanner != nil {
		scanner = host.Scanner
	}
	m.locator = workloads.NewLocator(cfg.PodNetns, scanner, log)
	m.locator.UseReported(m.reported)
	m.capture, err = redirect.Load(ctx, redirect.Config{CgroupRoot: root, PinDir: cfg.BPFPinDir, Logger: log.With("component", "capture")})
	if err != nil {
		return nil, fmt.Errorf("loading capture at cgroup %s: %w", root, err)
	}
	cleanup = append(cleanup, func() { _ = m.capture.Release() })
	// Capture state (acceleration, per-pod verification, program counters)
	// and SVID/root expiry, for the shipped dashboard and alerts.
	for _, c := range []prometheus.Collector{m.capture.Collector(), m.svids.Collector()} {
		if err := n.reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering capture and SVID metrics: %w", err)
		}
	}
	engine, err := policy.NewEngine(8192)
	if err != nil {
		return nil, fmt.Errorf("creating the policy engine: %w", err)
	}
	enforcer, err := enforce.New(enforce.Config{Snapshot: m.pol.Load, Engine: engine, Log: log.With("component", "policy")})
	if err != nil {
		return nil, err
	}
	resolver, err := resolve.New(resolve.Config{State: n.store.Snapshot, MeshCapable: n.meshCapable, Strict: enforcer.Strict, Log: log})
	if err != nil {
		return nil, err
	}
	obs := telemetry.New(telemetry.Config{Metrics: n.metrics, Ledger: n.ledger, State: n.store.Snapshot,
		ClusterDomain: cfg.ClusterDomain, ClusterID: cfg.ClusterID})
	routes, traffic := &l7mesh.Routes{}, &l7mesh.Traffic{}
	if cfg.OTLPEndpoint != "" {
		if m.tracer, err = tracing.New(ctx, tracing.Config{Endpoint: cfg.OTLPEndpoint, Sampling: cfg.TraceSampling, Node: cfg.NodeName}); err != nil {
			return nil, err
		}
		tr := m.tracer
		cleanup = append(cleanup, func() { _ = tr.Shutdown(context.Background()) })
	}
	l7layer, err := l7mesh.New(l7mesh.Config{
		Tracer:         m.tracer,
		Log:            log.With("component", "l7"),
		State:          n.store.Snapshot,
		Routes:         func() *route.Table { return routes.Table(n.store.Snapshot()) },
		Traffic:        func() *resilience.Set { return traffic.Set(n.store.Snapshot()) },
		Authorize:      enforcer.CheckRequest,
		RequestHeaders: enforcer.RequestHeaders,
		Observer:       obs,
	})
	if err != nil {
		return nil, err
	}
	m.l7, m.obs = l7layer, obs
	m.dp, err = dataplane.New(dataplane.Config{
		L7:       l7layer,
		Log:      log,
		Capture:  dataplane.Redirect(m.capture),
		SVIDs:    m.svids,
		Resolver: resolver,
		Policy:   enforcer,
		Observer: obs,
		Status: func(ns, name string, s telemetry.CaptureStatus) {
			n.metrics.SetCaptureStatus(ns, name, string(s))
			if s == telemetry.CaptureFailed {
				select {
				case m.failed <- struct{}{}:
				default:
				}
			}
		},
		DrainDeadline: cfg.DrainDeadline,
		// kubelet's probes survive an agent restart (docs/security.md).
		NodeProbePorts: func(p *state.Pod) []uint16 {
			if ps := m.pol.Load(); ps != nil {
				return ps.NodeProbePorts(p.Key().String())
			}
			return nil
		},
	})
	if err != nil {
		return nil, err
	}

	n.metrics.SetPoolStats(func() admin.PoolStats {
		s := m.dp.PoolStats()
		return admin.PoolStats{Hits: s.Hits, Misses: s.Misses, Handshakes: s.Handshakes, HandshakeErrors: s.HandshakeErrors,
			ScaleOuts: s.ScaleOuts, ResponseTimeouts: s.ResponseTimeouts, PingTimeouts: s.PingTimeouts, ExpiredConns: s.ExpiredConns,
			Conns: s.Conns, Streams: s.Streams}
	})
	n.metrics.SetTunnelStats(func() admin.TunnelStats {
		s := m.dp.TunnelStats()
		return admin.TunnelStats{Conns: s.Conns, Streams: s.Streams, HandshakesInFlight: s.HandshakesInFlight,
			Handshakes: s.Handshakes, HandshakeErrors: s.HandshakeErrors, ExpiredConns: s.ExpiredConns,
			Limits: map[string]uint64{
				"handshakes": s.HandshakeLimit, "peer_connections": s.PeerConnLimit, "timeout": s.Timeouts,
				"header_size": s.HeaderTooLarge, "streams": s.StreamLimit, "flood": s.Floods, "ping_timeout": s.PingTimeouts,
			}}
	})
	n.admin.AddDump("certificates", m.certificates)
	n.admin.AddDump("identity", m.identityDump)
	n.admin.AddDump("pools", m.dp.PoolsDump)
	n.admin.AddDump("capture", m.captureDump)
	n.admin.AddDump("l7", func() any { return l7layer.Dump(n.store.Snapshot(), routes, traffic) })
	n.admin.SetConnections(m.dp.Connections)
	// Live `nodemeshctl policy explain --agent`: decisions on the snapshot
	// this agent enforces.
	n.admin.Handle(explain.Path, explain.Handler(func() *policy.Snapshot {
		if ps := m.pol.Load(); ps != nil {
			return ps
		}
		return policy.NewSnapshot(0, policy.Input{}, policy.Options{TrustDomain: cfg.TrustDomain.Name()})
	}, func(pod string, port uint16) bool {
		ns, name, _ := strings.Cut(pod, "/")
		return m.l7.Claims(state.Key{Namespace: ns, Name: name}, port)
	}))
	n.admin.AddReadiness("svids", m.svidsReady)
	n.admin.AddReadiness("capture", func(context.Context) error {
		if !n.store.Snapshot().Synced() {
			return errors.New("waiting for cluster state to enroll pods")
		}
		return m.dp.Ready()
	})
	return m, nil
}

// newSVIDSource creates the identity source cfg.IdentitySource names.
func (m *mesh) newSVIDSource(ctx context.Context) error {
	cfg := m.n.cfg
	switch cfg.IdentitySource {
	case IdentitySPIFFE:
		src, err := workload.New(ctx, workload.Config{Addr: cfg.SPIFFEEndpoint, TrustDomain: cfg.TrustDomain, Log: m.log.With("component", "spiffe")})
		if err != nil {
			return fmt.Errorf("using the SPIFFE Workload API as the identity source (--spiffe-endpoint-socket): %w", err)
		}
		m.svids = src
		m.svidHint = "does SPIRE have a registration entry for it whose parent is this node's SPIRE agent and whose selectors match this nodemesh agent? Workload API " + src.Addr()
		m.log.Info("identity source: SPIFFE Workload API", "addr", src.Addr())
		return nil
	case IdentityCA, "":
		mgr, ca, err := svid.NewWithCA(svid.Config{TrustDomain: cfg.TrustDomain, Log: m.log.With("component", "svid")},
			svid.ClientConfig{URL: cfg.CAAddr, CAID: cfg.CAID, Token: svid.FileToken(cfg.CATokenFile)})
		if err != nil {
			return fmt.Errorf("creating the SVID manager: %w", err)
		}
		m.svids, m.ca, m.setBundle = mgr, ca, mgr.SetBundle
		m.svidHint = "is the CA at " + cfg.CAAddr + " reachable?"
		return nil
	}
	return fmt.Errorf("unknown identity source %q (want %s or %s)", cfg.IdentitySource, IdentityCA, IdentitySPIFFE)
}

// run keeps the mesh in step with the cluster state until ctx ends.
func (m *mesh) run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	errc := make(chan error, 2)
	wg.Go(func() {
		if err := m.svids.Run(ctx); err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("SVID source: %w", err)
		}
	})
	if m.setBundle != nil {
		wg.Go(func() {
			if err := identityk8s.RunBundleWatcher(ctx, m.n.client, m.n.cfg.BundleNamespace, m.n.cfg.BundleName, m.setBundle, m.log); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("trust bundle watcher: %w", err)
			}
		})
	}

	ch, unsub := m.n.store.Subscribe()
	defer unsub()
	var (
		applied, policyVersion uint64
		retry                  = time.NewTimer(time.Hour)
		retryDue               bool
	)
	retry.Stop()
	defer retry.Stop()
	for {
		snap := m.n.store.Snapshot()
		m.l7.Refresh(snap)
		m.obs.Refresh(snap)
		if snap.Synced() && (snap.Version() != applied || retryDue) {
			if snap.Version() != policyVersion {
				m.updatePolicy(ctx, snap)
				policyVersion = snap.Version()
			}
			next := m.pending.update(time.Now(), m.reconcile(ctx, snap))
			applied, retryDue = snap.Version(), false
			resetTimer(retry, next)
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-ch:
		case <-retry.C:
			// Retry the pods not captured yet (pendingPods).
			retryDue = true
		case <-m.cniWake:
			// A sandbox reported by the CNI plugin, whose ADD waits.
			retryDue = true
		case <-m.failed:
			// A capture failed (a self-check, or the reconcile's own
			// enrollments): schedule the retry of pods not pending yet.
			resetTimer(retry, m.pending.add(time.Now(), m.failedPods()))
		case <-time.After(10 * time.Second):
			// A full reconcile after a quiet while, whatever is pending.
			retryDue = true
		}
	}
}

// resetTimer makes t fire at next (stopped if next is zero).
func resetTimer(t *time.Timer, next time.Time) {
	t.Stop()
	if !next.IsZero() {
		t.Reset(time.Until(next))
	}
}

// failedPods lists the pods whose capture failed, for pendingPods.
func (m *mesh) failedPods() map[state.Key]pendingReason {
	out := make(map[state.Key]pendingReason)
	for k, s := range m.dp.Served() {
		if s.Failed {
			out[k] = pendingReason{UID: s.Pod.UID(), Reason: "capture failed"}
		}
	}
	return out
}

// updatePolicy enforces the policy of a new state snapshot and closes the
// open connections it denies.
func (m *mesh) updatePolicy(ctx context.Context, snap *state.Snapshot) {
	if m.polBuilder == nil {
		m.polBuilder = fromstate.NewBuilder("").WithLocalNode(m.filter.Node, m.syncNodeAddrs(nodeAddrs(m.log)))
	}
	ps, errs := m.polBuilder.Snapshot(snap)
	for _, err := range errs {
		m.log.Warn("policy object unreadable; enforced fail closed for its namespace", "err", err)
	}
	if old := m.pol.Swap(ps); old != nil {
		if n := m.dp.Reevaluate(ctx); n > 0 {
			m.log.Info("closed connections denied by the new policy", "connections", n)
		}
	}
	m.dp.RefreshNodeProbePorts(ctx)
}

// syncNodeAddrs wraps addrs (the node's interface addresses, which the
// policy counts as the node) so that capture gets every new list too: the
// sources whose connections to a pod's probe ports reach it while the
// agent is away (redirect.Capture.SetNodeAddrs).
//
// The policy builder asks on every state change; capture is told only when
// the list differs from the one it last took (reading its BPF map back
// each time was about 3 % of the agent's CPU under churn at 100,000 pods).
// Only this agent writes that map, so it still holds what it took.
func (m *mesh) syncNodeAddrs(addrs func() []netip.Addr) func() []netip.Addr {
	var synced []netip.Addr
	return func() []netip.Addr {
		a := addrs()
		if len(a) == 0 {
			return a // unreadable: keep the pinned list rather than empty it
		}
		if slices.Equal(a, synced) {
			return a
		}
		if changed, err := m.capture.SetNodeAddrs(a); err != nil {
			m.log.Warn("telling capture the node's addresses; kubelet's probes may fail while the agent restarts", "err", err)
		} else {
			synced = slices.Clone(a)
			if changed {
				m.log.Info("node addresses for kubelet probes while the agent is away", "addrs", fmt.Sprint(a))
			}
		}
		return a
	}
}

// reconcile enrolls, updates and unenrolls this node's pods to match snap,
// then releases pods a previous agent left captured that are no longer
// wanted. A pod that should be enrolled but failed to re-enroll stays
// captured (failing closed) for the retry, never released to plaintext.
// It returns the pods to retry: enrolled pods with an address whose network
// namespace is not found yet, and wanted pods whose capture failed.
func (m *mesh) reconcile(ctx context.Context, snap *state.Snapshot) map[state.Key]pendingReason {
	start := time.Now()
	var want []*state.Pod
	pending := make(map[state.Key]pendingReason)
	located := m.locator.Locate(snap.PodsOnNode(m.filter.Node))
	locateTook := time.Since(start)
	for _, p := range located {
		if m.filter.Wanted(p) {
			want = append(want, p)
		} else if waitsForNetns(m.filter, p) {
			pending[p.Key()] = pendingReason{UID: p.UID(), Reason: "network namespace not found yet"}
		}
	}
	plan := workloads.Plan(m.dp.Served(), want)
	m.dp.Apply(ctx, plan)
	if took := time.Since(start); took >= slowReconcile {
		// Where a new pod's wait for capture goes (docs/cluster.md, Churn).
		m.log.Info("slow reconcile", "took", took.Round(time.Millisecond), "locate", locateTook.Round(time.Millisecond),
			"actions", len(plan), "pods", len(located), "state_version", snap.Version())
	}
	served := m.dp.Served()
	for _, p := range want {
		if s, ok := served[p.Key()]; ok && s.Failed {
			pending[p.Key()] = pendingReason{UID: p.UID(), Reason: "capture failed"}
		}
	}
	wanted := workloads.WantedIPs(want)
	for _, p := range m.capture.AdoptedPods() {
		keep := false
		for _, ip := range p.IPs {
			keep = keep || wanted[ip.Unmap()]
		}
		if keep {
			m.log.Warn("a pod left captured by the previous agent is not re-enrolled yet; it stays captured (failing closed) until it is", "ips", fmt.Sprint(p.IPs))
			continue
		}
		if err := m.capture.UnenrollCookie(p.Cookie); err != nil {
			m.log.Warn("releasing a pod left captured by a previous agent", "ips", fmt.Sprint(p.IPs), "err", err)
			continue
		}
		m.log.Info("released a pod left captured by a previous agent", "ips", fmt.Sprint(p.IPs))
	}
	return pending
}

// slowReconcile is how long a reconcile may take before it is logged.
const slowReconcile = time.Second

// waitsForNetns reports whether f would want p but for its network
// namespace, which the locator has not found yet. A terminating pod whose
// sandbox is gone is not waited for.
func waitsForNetns(f workloads.Filter, p *state.Pod) bool {
	if p.Netns() != "" || p.UID() == "" || p.Terminating {
		return false
	}
	q := *p
	q.SetLocation("(not found yet)", q.Cgroup())
	return f.Wanted(&q)
}

// close stops serving, leaving capture pinned (Release) so enrolled pods
// fail closed until the next agent adopts them.
func (m *mesh) close() error {
	err := m.dp.Close()
	m.reported.Close()
	err = errors.Join(err, m.capture.Release())
	if m.ca != nil {
		m.ca.Close()
	}
	if m.tracer != nil {
		// The spans of the last requests go out before the agent exits.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if terr := m.tracer.Shutdown(ctx); terr != nil {
			m.log.Warn("exporting the last spans", "err", terr)
		}
	}
	return err
}

// certDump is one SVID in the config dump.
type certDump struct {
	SPIFFEID  string    `json:"spiffeId"`
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	Serial    string    `json:"serial,omitempty"`
	// Issuer and AuthorityKeyID name the CA that signed the SVID (the
	// nodemesh CA's root, or SPIRE's): the key ID is the signer's
	// SubjectKeyId, hex.
	Issuer         string `json:"issuer,omitempty"`
	AuthorityKeyID string `json:"authorityKeyId,omitempty"`
	Error          string `json:"error,omitempty"`
}

func (m *mesh) certificates() any {
	out := []certDump{}
	for _, id := range m.svids.IDs() {
		c := certDump{SPIFFEID: id.String()}
		s, err := m.svids.SVIDSource(id).GetX509SVID()
		if err != nil {
			c.Error = err.Error()
		} else if len(s.Certificates) > 0 {
			c.NotBefore, c.NotAfter = s.Certificates[0].NotBefore, s.Certificates[0].NotAfter
			c.Serial = s.Certificates[0].SerialNumber.Text(16)
			c.Issuer = s.Certificates[0].Issuer.String()
			c.AuthorityKeyID = hex.EncodeToString(s.Certificates[0].AuthorityKeyId)
		}
		out = append(out, c)
	}
	return out
}

// identityDump is the "identity" section of the config dump: where the
// SVIDs come from and, for the Workload API, which identities it provides
// this agent (those with a registration entry under this node), whether or
// not a pod here runs as them.
//
// Both sources list the mesh trust domain's roots the agent verifies peers
// with (the CA's bundle, or SPIRE's), so that `nodemeshctl check` judges
// root expiry from what the agents use, with or without the CA's ConfigMap.
func (m *mesh) identityDump() any {
	d := map[string]any{"source": IdentityCA, "caAddr": m.n.cfg.CAAddr}
	if src, ok := m.svids.(*workload.Source); ok {
		provided := []string{}
		for _, id := range src.Provided() {
			provided = append(provided, id.String())
		}
		d = map[string]any{"source": IdentitySPIFFE, "endpoint": src.Addr(), "provided": provided}
	}
	roots := []rootDump{}
	b, err := m.svids.GetX509BundleForTrustDomain(m.n.cfg.TrustDomain)
	if err != nil {
		d["rootsError"] = err.Error()
	} else {
		for _, c := range b.X509Authorities() {
			roots = append(roots, rootDump{Subject: c.Subject.String(), SubjectKeyID: hex.EncodeToString(c.SubjectKeyId), NotAfter: c.NotAfter})
		}
	}
	d["roots"] = roots
	return d
}

// rootDump is one root of the trust bundle in the identity dump.
type rootDump struct {
	Subject      string    `json:"subject"`
	SubjectKeyID string    `json:"subjectKeyId,omitempty"`
	NotAfter     time.Time `json:"notAfter"`
}

func (m *mesh) captureDump() any {
	on, why := m.capture.Accel()
	st := m.capture.Status()
	source := map[string]any{}
	for _, p := range st.Pods {
		if p.Name != "" {
			source[p.Name] = map[string]any{"preserved": p.SourcePreserved, "reason": p.SourceReason}
		}
	}
	// The node's addresses whose connections reach the pods' probe ports
	// while no agent listens (docs/security.md).
	probeSources, _ := m.capture.NodeAddrs()
	return map[string]any{"pods": m.dp.Pods(), "adopted": m.capture.Adopted(), "acceleration": on, "accelerationReason": why,
		"probeSourceAddrs":    probeSources,
		"cniSandboxes":        m.reported.Len(),
		"transparentDelivery": st.Transparent, "transparentDeliveryReason": st.TransparentReason, "inboundSource": source}
}

func (m *mesh) svidsReady(context.Context) error {
	var missing []string
	for _, id := range m.svids.IDs() {
		if _, err := m.svids.SVIDSource(id).GetX509SVID(); err != nil {
			missing = append(missing, id.String())
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("no SVID yet for %s (%s)", strings.Join(missing, ", "), m.svidHint)
	}
	return nil
}

// nodeAddrs returns a function listing the addresses of this node's
// network interfaces (the agent runs in the node's network namespace), read
// again at most once a second: the sources kubelet's probes may come from.
// Loopback and link-local addresses are left out: no probe to a pod comes
// from them.
func nodeAddrs(log *slog.Logger) func() []netip.Addr {
	var (
		mu   sync.Mutex
		last []netip.Addr
		at   time.Time
	)
	return func() []netip.Addr {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(at) < time.Second {
			return last
		}
		at = time.Now()
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			log.Warn("listing the node's addresses for kubelet probes; keeping the last list", "err", err)
			return last
		}
		var out []netip.Addr
		for _, a := range addrs {
			n, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(n.IP)
			if ip = ip.Unmap(); ok && !ip.IsLoopback() && !ip.IsLinkLocalUnicast() {
				out = append(out, ip)
			}
		}
		last = out
		return last
	}
}
