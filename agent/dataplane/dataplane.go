// Package dataplane runs the per-pod data plane of a node: for every pod
// the agent serves, it requests the pod's SVID, enrolls the pod in capture,
// opens the pod's HBONE pool and proxy on the agent's sockets inside the
// pod, and proves that capture works (self-check); when the pod leaves it
// drains and retires them. It applies the actions agent/workloads plans
// and reports each pod's capture status.
//
// Each pod has its own proxy and HBONE pool: tunnels are dialled from
// inside the pod's network namespace (as ztunnel does in-pod), so the
// destination sees the source pod's IP as the TCP peer, and NetworkPolicy
// at the destination matches the real source.
//
// Capture and SVIDs are small interfaces (Capture, SVIDs); the resolver,
// policy and observer are the proxy's. With the in-memory fakes of
// dataplanetest the package runs under -race without root.
package dataplane

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
	"github.com/nodemesh/nodemesh/agent/workloads"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/redirect"
)

// Config wires a Dataplane. Capture, SVIDs, Resolver and Policy are
// required.
type Config struct {
	Log     *slog.Logger
	Capture Capture
	// SVIDs holds the pods' SVIDs and the trust bundle their TLS uses.
	SVIDs    SVIDs
	Resolver proxy.Resolver
	Policy   proxy.Policy
	// Observer receives every connection event (nil: none).
	Observer proxy.Observer
	// L7 handles Services opted in to HTTP handling (nil: all L4).
	L7 proxy.L7
	// Status is told each pod's capture status, and "" when the pod
	// leaves (nil: not reported). It must not block.
	Status func(namespace, name string, s telemetry.CaptureStatus)
	// DrainDeadline bounds how long a leaving pod's open connections may
	// finish (default 30 s).
	DrainDeadline time.Duration
	// SelfCheckBackoff is the first delay between self-check attempts; it
	// grows linearly over 10 attempts (default 200 ms).
	SelfCheckBackoff time.Duration
	// NodeProbePorts returns the ports of a pod that connections from the
	// node reach directly while the agent is away
	// (redirect.Pod.NodeProbePorts): the probe ports the current policy
	// admits from the node whatever the connection carries
	// (policy.Snapshot.NodeProbePorts). Nil: none, every probe fails
	// closed while the agent is away. Called from Apply and
	// RefreshNodeProbePorts only.
	NodeProbePorts func(p *state.Pod) []uint16
}

// Dataplane serves the pods of one node. Apply is called by one goroutine
// (the reconcile loop); everything else may be called concurrently.
type Dataplane struct {
	cfg Config
	log *slog.Logger
	tls hbone.SPIFFETLS // from cfg.SVIDs

	ctx    context.Context // parent of the pods' serving contexts
	cancel context.CancelFunc

	mu             sync.Mutex
	pods           map[state.Key]*pod
	retired        hbone.PoolStats   // counters of the pools of pods gone, so totals stay monotonic
	retiredTunnels hbone.ServerStats // the same for their inbound HBONE servers
	draining       map[*pod]struct{} // taken out of pods, not yet retired: still counted
	wg             sync.WaitGroup    // retiring pods' drains
}

// pod is a pod the data plane serves. Its captured, pool and proxy fields
// are set before the pod is published in Dataplane.pods and never change
// afterwards; status, problem and excluded are guarded by Dataplane.mu.
type pod struct {
	p        *state.Pod
	w        *proxy.Workload
	captured CapturedPod // nil: enrollment failed
	pool     *hbone.Pool
	proxy    *proxy.Proxy // nil: enrollment failed
	ctx      context.Context
	cancel   context.CancelFunc
	done     sync.WaitGroup // the pod's listeners and self-checks

	status               telemetry.CaptureStatus
	problem              string
	excluded, excludedIn []uint16
	nodePorts            []uint16 // in capture now (redirect.Pod.NodeProbePorts)
}

// New checks cfg and returns a Dataplane serving no pod.
func New(cfg Config) (*Dataplane, error) {
	if cfg.Capture == nil || cfg.SVIDs == nil || cfg.Resolver == nil || cfg.Policy == nil {
		return nil, errors.New("creating the data plane: Config.Capture, SVIDs, Resolver and Policy are required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Status == nil {
		cfg.Status = func(string, string, telemetry.CaptureStatus) {}
	}
	if cfg.DrainDeadline <= 0 {
		cfg.DrainDeadline = 30 * time.Second
	}
	if cfg.SelfCheckBackoff <= 0 {
		cfg.SelfCheckBackoff = 200 * time.Millisecond
	}
	d := &Dataplane{cfg: cfg, log: cfg.Log, pods: make(map[state.Key]*pod), tls: hbone.SPIFFETLS{
		SVID:    identity.SVIDFunc(cfg.SVIDs),
		Bundles: cfg.SVIDs,
	}}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d, nil
}

// Served returns what the data plane serves, for workloads.Plan.
func (d *Dataplane) Served() map[state.Key]workloads.Served {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[state.Key]workloads.Served, len(d.pods))
	for k, pd := range d.pods {
		out[k] = workloads.Served{Pod: pd.p, Excluded: pd.excluded, ExcludedIn: pd.excludedIn, Captured: pd.captured != nil,
			Failed: pd.status == telemetry.CaptureFailed}
	}
	return out
}

// Apply carries out planned actions. A failure is logged and shows in the
// pod's status (Failed), for the next plan to retry.
func (d *Dataplane) Apply(ctx context.Context, actions []workloads.Action) {
	for _, a := range actions {
		switch a.Kind {
		case workloads.Unenroll:
			if pd := d.take(a.Key); pd != nil {
				d.unenroll(pd)
			}
		case workloads.Enroll:
			d.enroll(ctx, a.Pod)
		case workloads.Retry:
			if pd := d.take(a.Key); pd != nil {
				d.unenroll(pd)
			}
			d.enroll(ctx, a.Pod)
		case workloads.Recheck:
			d.mu.Lock()
			pd := d.pods[a.Key]
			d.mu.Unlock()
			if pd != nil && pd.captured != nil {
				d.setStatus(pd, telemetry.CaptureEnrolled, "")
				pd.done.Go(func() { d.selfCheck(pd) })
			}
		case workloads.UpdateExcluded:
			d.mu.Lock()
			pd := d.pods[a.Key]
			d.mu.Unlock()
			if pd == nil {
				continue
			}
			cp := d.capturePod(a.Pod)
			if err := d.cfg.Capture.Update(ctx, cp); err != nil {
				d.log.Error("updating the pod's excluded ports", "pod", a.Key.String(), "err", err)
				continue
			}
			d.mu.Lock()
			pd.excluded, pd.excludedIn, pd.nodePorts = a.Pod.ExcludeOutboundPorts(), a.Pod.ExcludeInboundPorts(), cp.NodeProbePorts
			d.mu.Unlock()
		}
	}
}

func (d *Dataplane) take(k state.Key) *pod {
	d.mu.Lock()
	defer d.mu.Unlock()
	pd := d.pods[k]
	delete(d.pods, k)
	if pd != nil && pd.proxy != nil {
		if d.draining == nil {
			d.draining = make(map[*pod]struct{})
		}
		d.draining[pd] = struct{}{}
	}
	return pd
}

func (d *Dataplane) capturePod(p *state.Pod) redirect.Pod {
	var nodePorts []uint16
	if d.cfg.NodeProbePorts != nil {
		nodePorts = d.cfg.NodeProbePorts(p)
	}
	return redirect.Pod{Name: p.Key().String(), Netns: p.Netns(), Cgroup: p.Cgroup(), IPs: p.IPs,
		ExcludeOutboundPorts: p.ExcludeOutboundPorts(), ExcludeInboundPorts: p.ExcludeInboundPorts(), NodeProbePorts: nodePorts}
}

// RefreshNodeProbePorts asks NodeProbePorts again for every captured pod
// (after a policy change) and updates capture where the answer changed.
// Called by the goroutine that calls Apply.
func (d *Dataplane) RefreshNodeProbePorts(ctx context.Context) {
	if d.cfg.NodeProbePorts == nil {
		return
	}
	d.mu.Lock()
	pods := make([]*pod, 0, len(d.pods))
	for _, pd := range d.pods {
		if pd.captured != nil {
			pods = append(pods, pd)
		}
	}
	d.mu.Unlock()
	for _, pd := range pods {
		cp := d.capturePod(pd.p)
		d.mu.Lock()
		same := slices.Equal(cp.NodeProbePorts, pd.nodePorts)
		d.mu.Unlock()
		if same {
			continue
		}
		if err := d.cfg.Capture.Update(ctx, cp); err != nil {
			d.log.Error("updating the pod's probe ports open to the node", "pod", pd.p.Key().String(), "err", err)
			continue
		}
		d.mu.Lock()
		pd.nodePorts = cp.NodeProbePorts
		d.mu.Unlock()
		d.log.Info("probe ports open to the node while the agent is away changed", "pod", pd.p.Key().String(), "ports", fmt.Sprint(cp.NodeProbePorts))
	}
}

// owner names a pod's claim on its SVID.
func owner(p *state.Pod) string {
	if p.UID() != "" {
		return p.UID()
	}
	return p.Key().String()
}

func (d *Dataplane) publish(pd *pod, status telemetry.CaptureStatus, problem string) {
	d.mu.Lock()
	pd.status, pd.problem = status, problem
	d.pods[pd.p.Key()] = pd
	d.mu.Unlock()
	d.cfg.Status(pd.p.Namespace, pd.p.Name, status)
}

func (d *Dataplane) setStatus(pd *pod, status telemetry.CaptureStatus, problem string) {
	d.mu.Lock()
	pd.status, pd.problem = status, problem
	d.mu.Unlock()
	d.cfg.Status(pd.p.Namespace, pd.p.Name, status)
}

// enroll builds everything a pod needs, then publishes it: the pod is
// visible to the other methods only complete (or failed).
func (d *Dataplane) enroll(ctx context.Context, p *state.Pod) {
	log := d.log.With("pod", p.Key().String())
	pd := &pod{p: p, excluded: p.ExcludeOutboundPorts(), excludedIn: p.ExcludeInboundPorts(),
		w: &proxy.Workload{Namespace: p.Namespace, Name: p.Name, Identity: p.Identity, IPs: p.IPs, Netns: p.Netns()}}
	if err := d.cfg.SVIDs.Add(owner(p), p.Identity); err != nil {
		log.Error("requesting the pod's SVID", "spiffe_id", p.Identity.String(), "err", err)
		d.publish(pd, telemetry.CaptureFailed, err.Error())
		return
	}
	cp := d.capturePod(p)
	pd.nodePorts = cp.NodeProbePorts
	captured, err := d.cfg.Capture.Enroll(ctx, cp)
	if err != nil {
		// Retried on the next plan; the pod keeps whatever capture it had
		// (none, or pinned and failing closed).
		log.Error("enrolling the pod in capture", "err", err)
		d.publish(pd, telemetry.CaptureFailed, err.Error())
		return
	}
	if err := d.serve(pd, captured, log); err != nil {
		log.Error("creating the pod's proxy", "err", err)
		if err := d.cfg.Capture.Unenroll(captured); err != nil {
			log.Warn("unenrolling a pod whose proxy failed", "err", err)
		}
		d.publish(pd, telemetry.CaptureFailed, err.Error())
		return
	}
	d.publish(pd, telemetry.CaptureEnrolled, "")
	pd.done.Go(func() { d.selfCheck(pd) })
	log.Info("pod enrolled", "spiffe_id", p.Identity.String(), "ips", fmt.Sprint(p.IPs))
}

// serve creates pd's pool and proxy and starts serving its sockets.
func (d *Dataplane) serve(pd *pod, captured CapturedPod, log *slog.Logger) error {
	dial := d.cfg.Capture.Dialer(pd.p.Netns())
	pool, err := hbone.NewPool(hbone.PoolConfig{TLS: d.tls, Logger: log.With("component", "pool"), Dial: dial.DialContext})
	if err != nil {
		return err
	}
	pxDial := dial
	if t, ok := captured.(inboundDialer); ok {
		pxDial = t.InboundDialer(dial)
	}
	px, err := proxy.New(proxy.Config{
		Logger: log.With("component", "proxy"), Resolver: d.cfg.Resolver, Pool: pool, ServerTLS: d.tls,
		Dialer: pxDial, Policy: d.cfg.Policy, Observer: d.cfg.Observer, L7: d.cfg.L7,
	})
	if err != nil {
		_ = pool.Close()
		return err
	}
	pd.captured, pd.pool, pd.proxy = captured, pool, px
	pd.ctx, pd.cancel = context.WithCancel(d.ctx)
	s := captured.Sockets()
	run := func(what string, f func() error) {
		pd.done.Go(func() {
			if err := f(); err != nil && pd.ctx.Err() == nil && !errors.Is(err, proxy.ErrStopped) && !errors.Is(err, net.ErrClosed) {
				log.Warn("in-pod listener stopped", "listener", what, "err", err)
			}
		})
	}
	for _, ln := range s.Outbound {
		run("outbound", func() error { return px.ServeOutbound(pd.ctx, ln, pd.w, s.OrigDst) })
	}
	for _, ln := range s.Inbound {
		run("inbound", func() error { return px.ServeInboundPlaintext(pd.ctx, ln, pd.w, nil) })
	}
	for _, ln := range s.HBONE {
		run("hbone", func() error { return px.ServeInboundHBONE(pd.ctx, ln, pd.w) })
	}
	return nil
}

// selfCheck proves capture works for the pod, retrying for a while (the
// accept loops may not have started yet).
func (d *Dataplane) selfCheck(pd *pod) {
	ctx := pd.ctx
	var err error
	for attempt := range 10 {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = pd.captured.SelfCheck(cctx)
		cancel()
		if err == nil {
			d.setStatus(pd, telemetry.CaptureVerified, "")
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(attempt+1) * d.cfg.SelfCheckBackoff):
		}
	}
	d.log.Error("capture self-check failed", "pod", pd.p.Key().String(), "err", err)
	d.setStatus(pd, telemetry.CaptureFailed, err.Error())
}

// unenroll stops capturing a pod (already removed from d.pods); its open
// connections may finish until the drain deadline.
func (d *Dataplane) unenroll(pd *pod) {
	// Capture first: it takes the listeners out of its maps before closing
	// them (a listener closed earlier has already left the sockmap, and
	// deleting its slot then fails with EINVAL).
	if pd.captured != nil {
		if err := d.cfg.Capture.Unenroll(pd.captured); err != nil {
			d.log.Warn("unenrolling a pod", "pod", pd.p.Key().String(), "err", err)
		}
	}
	if pd.cancel != nil {
		pd.cancel()
	}
	pd.done.Wait()
	if pd.proxy != nil {
		// Connections already open may finish (up to the drain deadline);
		// the SVID stays until then, since they still present it.
		d.wg.Go(func() {
			ctx, cancel := context.WithTimeout(d.ctx, d.cfg.DrainDeadline)
			_ = pd.proxy.Drain(ctx)
			cancel()
			d.retire(pd)
			d.cfg.SVIDs.Remove(owner(pd.p))
		})
	} else {
		d.cfg.SVIDs.Remove(owner(pd.p))
	}
	d.cfg.Status(pd.p.Namespace, pd.p.Name, "")
	d.log.Info("pod unenrolled", "pod", pd.p.Key().String())
}

// retire closes a pod's proxy and pool and keeps its pool counters.
func (d *Dataplane) retire(pd *pod) {
	_ = pd.proxy.Close()
	tun := pd.proxy.TunnelStats()
	st := pd.pool.Stats()
	_ = pd.pool.Close()
	d.mu.Lock()
	d.retired.AddCounters(st)
	d.retiredTunnels.AddCounters(tun)
	delete(d.draining, pd)
	d.mu.Unlock()
}

// served returns the pods with a running proxy.
func (d *Dataplane) served() []*pod {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]*pod, 0, len(d.pods))
	for _, pd := range d.pods {
		if pd.proxy != nil {
			out = append(out, pd)
		}
	}
	return out
}

// Reevaluate checks every open connection against the policy again (after
// a new policy snapshot) and returns how many it closed.
func (d *Dataplane) Reevaluate(ctx context.Context) int {
	n := 0
	for _, pd := range d.served() {
		n += pd.proxy.Reevaluate(ctx)
	}
	return n
}

// counted returns the pods whose pools and servers count in the totals:
// the served ones and those draining; with the retired counters taken under
// the same lock, so that a pod is counted exactly once.
func (d *Dataplane) counted() (pods []*pod, pools hbone.PoolStats, tunnels hbone.ServerStats) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, pd := range d.pods {
		if pd.proxy != nil {
			pods = append(pods, pd)
		}
	}
	for pd := range d.draining {
		pods = append(pods, pd)
	}
	return pods, d.retired, d.retiredTunnels
}

// PoolStats sums the HBONE pools' counters, including those of pods gone.
func (d *Dataplane) PoolStats() hbone.PoolStats {
	pods, total, _ := d.counted()
	for _, pd := range pods {
		total.Add(pd.pool.Stats())
	}
	return total
}

// TunnelStats sums the inbound HBONE servers' counters, including those of
// pods gone.
func (d *Dataplane) TunnelStats() hbone.ServerStats {
	pods, _, total := d.counted()
	for _, pd := range pods {
		total.Add(pd.proxy.TunnelStats())
	}
	return total
}

// PoolsDump is the "pools" section of the config dump.
func (d *Dataplane) PoolsDump() any {
	pods := map[string]hbone.PoolStats{}
	for _, pd := range d.served() {
		pods[pd.p.Key().String()] = pd.pool.Stats()
	}
	return map[string]any{"total": d.PoolStats(), "pods": pods}
}

// PodStatus is one pod in the capture dump.
type PodStatus struct {
	Pod      string                  `json:"pod"`
	SPIFFEID string                  `json:"spiffeId"`
	IPs      []string                `json:"ips"`
	Netns    string                  `json:"netns"`
	Status   telemetry.CaptureStatus `json:"status"`
	Problem  string                  `json:"problem,omitempty"`
}

// Pods returns the capture status of every pod, sorted.
func (d *Dataplane) Pods() []PodStatus {
	d.mu.Lock()
	out := make([]PodStatus, 0, len(d.pods))
	for _, pd := range d.pods {
		s := PodStatus{Pod: pd.p.Key().String(), SPIFFEID: pd.p.Identity.String(), Netns: pd.p.Netns(),
			Status: pd.status, Problem: pd.problem}
		for _, ip := range pd.p.IPs {
			s.IPs = append(s.IPs, ip.String())
		}
		out = append(out, s)
	}
	d.mu.Unlock()
	slices.SortFunc(out, func(a, b PodStatus) int { return strings.Compare(a.Pod, b.Pod) })
	return out
}

// Ready reports an error naming every pod whose capture is not verified.
func (d *Dataplane) Ready() error {
	var bad []string
	for _, s := range d.Pods() {
		if s.Status != telemetry.CaptureVerified {
			m := s.Pod + " (" + string(s.Status)
			if s.Problem != "" {
				m += ": " + s.Problem
			}
			bad = append(bad, m+")")
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("capture not verified for %s", strings.Join(bad, ", "))
	}
	return nil
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

// Connections lists the open connections of every pod (/connections).
func (d *Dataplane) Connections() any {
	var infos []proxy.ConnInfo
	for _, pd := range d.served() {
		infos = append(infos, pd.proxy.Connections()...)
	}
	out := make([]connDump, 0, len(infos))
	for _, c := range infos {
		f := c.Flow
		cd := connDump{ID: c.ID, Direction: f.Direction.String(), Transport: f.Transport.String(), Src: f.Src.String(),
			Dst: f.Dst.String(), DstWorkload: f.DstWorkload, Service: f.Service, Start: c.Start, Sent: c.Sent, Received: c.Received}
		if f.Workload != nil {
			cd.Pod = f.Workload.String()
		}
		if f.OrigDst.IsValid() {
			cd.OrigDst = f.OrigDst.String()
		}
		if !f.SrcIdentity.IsZero() {
			cd.SrcIdentity = f.SrcIdentity.String()
		}
		if !f.DstIdentity.IsZero() {
			cd.DstIdentity = f.DstIdentity.String()
		}
		out = append(out, cd)
	}
	slices.SortFunc(out, func(a, b connDump) int { return cmp.Or(strings.Compare(a.Pod, b.Pod), cmp.Compare(a.ID, b.ID)) })
	return out
}

// Drain drains every pod's proxy in parallel until ctx ends.
func (d *Dataplane) Drain(ctx context.Context) error {
	var wg sync.WaitGroup
	pods := d.served()
	errs := make(chan error, len(pods))
	for _, pd := range pods {
		wg.Go(func() {
			if err := pd.proxy.Drain(ctx); err != nil {
				errs <- fmt.Errorf("pod %s: %w", pd.p.Key(), err)
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

// Close stops serving every pod and waits for all goroutines. It leaves
// capture alone: the owner of the capture releases it (pinned, so that
// enrolled pods fail closed until the next agent adopts them).
func (d *Dataplane) Close() error {
	d.cancel()
	d.mu.Lock()
	pods := make([]*pod, 0, len(d.pods))
	for _, pd := range d.pods {
		pods = append(pods, pd)
	}
	d.mu.Unlock()
	var errs []error
	for _, pd := range pods {
		if pd.proxy != nil {
			errs = append(errs, pd.proxy.Close())
		}
		pd.done.Wait()
		if pd.pool != nil {
			errs = append(errs, pd.pool.Close())
		}
	}
	d.wg.Wait() // pods being retired: their proxies close at once now
	return errors.Join(errs...)
}
