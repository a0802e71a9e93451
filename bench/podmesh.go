package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/bench/load"
	labmesh "github.com/nodemesh/nodemesh/lab/mesh"
)

// nodemesh in per-pod sidecar mode: the same agent binary and capture as
// the node agent, started once per pod with --only-pod, the pod's own
// cgroup as capture root, its own BPF pin directory and admin ports. Its
// pods live on nodes of their own (node-3 client, node-4 servers) so the
// node agents of node-1 and node-2 never serve them.
const (
	node3       = "node-3"
	node4       = "node-4"
	podPSClient = meshNS + "/ps-client"
	podPSServer = meshNS + "/ps-server"
	// Per-pod agents' admin, metrics and readiness ports on their node's
	// loopback: base + the agent's index.
	podAdminBase     = 16000
	podMetricsBase   = 17000
	podReadinessBase = 18000
	// podMarkHolder holds the sidecar nodes' marks: per-pod agents do not
	// claim their node (several on one node would fight over the Lease),
	// so whoever deploys them marks the node, as the bench does here.
	podMarkHolder = "nodemesh-bench-sidecar-mode"
)

// podAgent is one per-pod agent.
type podAgent struct {
	Pod, Node, Proc, Admin, Log string
	Pid                         int
}

// podSidecarServerPods returns the per-pod scenario's server pod keys for
// n pods per node.
func podSidecarServerPods(n int) []string {
	out := []string{podPSServer}
	for i := 2; i <= n; i++ {
		out = append(out, fmt.Sprintf("%s/ps-server-%d", meshNS, i))
	}
	return out
}

// startPodSidecars marks node-3 and node-4 mesh-capable and starts a
// per-pod agent for the client and the first server.
func (r *runner) startPodSidecars(ctx context.Context, m *mesh) error {
	if err := r.markPodNodes(ctx); err != nil {
		return err
	}
	keys := []string{podPSClient, podPSServer}
	for _, k := range keys {
		if err := r.startPodAgent(ctx, m, k); err != nil {
			return err
		}
	}
	return r.waitPodAgents(ctx, m, keys)
}

// markPodNodes writes the node marks of the per-pod scenario's nodes
// (fresh for an hour, longer than any run).
func (r *runner) markPodNodes(ctx context.Context) error {
	leases := r.lab.Server.Client.CoordinationV1().Leases(rollout.DefaultNamespace)
	for _, node := range []string{node3, node4} {
		now := metav1.NewMicroTime(time.Now())
		l := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: rollout.LeaseName(node), Namespace: rollout.DefaultNamespace, Labels: map[string]string{rollout.LabelNode: node}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(podMarkHolder), LeaseDurationSeconds: ptr.To(int32(3600)),
				AcquireTime: &now, RenewTime: &now},
		}
		_, err := leases.Create(ctx, l, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			var cur *coordinationv1.Lease
			if cur, err = leases.Get(ctx, l.Name, metav1.GetOptions{}); err == nil {
				cur.Spec = l.Spec
				_, err = leases.Update(ctx, cur, metav1.UpdateOptions{})
			}
		}
		if err != nil {
			return fmt.Errorf("marking %s mesh-capable for the per-pod agents: %w", node, err)
		}
	}
	return nil
}

// startPodAgent starts the per-pod agent of pod key (once).
func (r *runner) startPodAgent(ctx context.Context, m *mesh, key string) error {
	if _, ok := m.pods[key]; ok {
		return nil
	}
	p, err := r.lab.Pod(key)
	if err != nil {
		return err
	}
	i := len(m.pods) + 1
	a := &podAgent{Pod: key, Node: p.Node, Proc: labmesh.AgentProcess + "-" + p.Name, Admin: net.JoinHostPort("127.0.0.1", strconv.Itoa(podAdminBase+i))}
	la, err := m.StartAgent(ctx, labmesh.AgentSpec{Node: p.Node, Name: "pod-" + p.Name, Process: a.Proc, CgroupRoot: p.Cgroup, Args: []string{
		"--only-pod", key,
		"--admin-addr", a.Admin,
		"--metrics-addr", net.JoinHostPort("127.0.0.1", strconv.Itoa(podMetricsBase+i)),
		"--readiness-addr", net.JoinHostPort("127.0.0.1", strconv.Itoa(podReadinessBase+i)),
	}})
	if err != nil {
		return err
	}
	a.Pid, a.Log = la.Pid, la.Log
	m.pods[key] = a
	return nil
}

// waitPodAgents waits until each of keys is verified by its own agent.
func (r *runner) waitPodAgents(ctx context.Context, m *mesh, keys []string) error {
	deadline := time.Now().Add(3 * time.Minute)
	for {
		var last error
		for _, k := range keys {
			if last = r.podAgentVerified(ctx, m, k); last != nil {
				break
			}
		}
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for the per-pod agents: %w%s", last, m.LogTails())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// podAgentVerified checks that key's agent serves exactly key, verified.
func (r *runner) podAgentVerified(ctx context.Context, m *mesh, key string) error {
	a, ok := m.pods[key]
	if !ok {
		return fmt.Errorf("no per-pod agent for %s", key)
	}
	b, err := m.Fetch(ctx, a.Node, "http://"+a.Admin+"/config_dump/capture", 5*time.Second)
	if err != nil {
		return err
	}
	var cd labmesh.CaptureStatus
	if err := json.Unmarshal(b, &cd); err != nil {
		return fmt.Errorf("decoding the capture status of %s's agent: %w", key, err)
	}
	var status string
	for _, p := range cd.Pods {
		if p.Pod != key {
			return fmt.Errorf("the per-pod agent of %s also serves %s: --only-pod is not honoured", key, p.Pod)
		}
		status = p.Status
		if p.Problem != "" {
			status += " (" + p.Problem + ")"
		}
	}
	if status != "verified" {
		return fmt.Errorf("per-pod agent: pod %s is %q, not verified", key, status)
	}
	// Verified capture is not yet an SVID: wait for the agent's readiness
	// (state, SVIDs, capture) too, or the first tunnels are refused.
	b, err = m.Fetch(ctx, a.Node, "http://"+a.Admin+"/status", 5*time.Second)
	if err != nil {
		return err
	}
	var st struct {
		Ready  bool `json:"ready"`
		Checks any  `json:"checks"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("decoding the status of %s's agent: %w", key, err)
	}
	if !st.Ready {
		return fmt.Errorf("per-pod agent of %s is not ready: %v", key, st.Checks)
	}
	return nil
}

// podAgentProcs are the per-pod agents' pids named "agent <pod>".
func (m *mesh) podAgentProcs() map[string]int {
	out := map[string]int{}
	for k, a := range m.pods {
		out["agent "+k] = a.Pid
	}
	return out
}

// unmarkPodNodes removes the node marks markPodNodes wrote (the per-pod
// agents themselves are stopped with the mesh).
func (r *runner) unmarkPodNodes(ctx context.Context) {
	leases := r.lab.Server.Client.CoordinationV1().Leases(rollout.DefaultNamespace)
	for _, node := range []string{node3, node4} {
		if l, err := leases.Get(ctx, rollout.LeaseName(node), metav1.GetOptions{}); err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == podMarkHolder {
			_ = leases.Delete(ctx, l.Name, metav1.DeleteOptions{})
		}
	}
}

// scalePodSidecars measures per-pod agents with n server pods on node-4,
// one agent each, plus the client's.
func (r *runner) scalePodSidecars(ctx context.Context, n int, pt *ScalePoint) error {
	p := r.o.Profile
	m := r.mesh
	servers := podSidecarServerPods(n)
	for _, s := range servers {
		if err := r.startPodAgent(ctx, m, s); err != nil {
			return err
		}
	}
	if err := r.waitPodAgents(ctx, m, append([]string{podPSClient}, servers...)); err != nil {
		return err
	}
	var addrs []string
	for _, key := range servers {
		pod, err := r.lab.Pod(key)
		if err != nil {
			return err
		}
		addrs = append(addrs, net.JoinHostPort(pod.IP, strconv.Itoa(load.DefaultHTTPPort)))
	}
	cfg := load.Config{Kind: load.KindHTTP, Addr: addrs[0], Addrs: addrs, Conns: max(16, n), Rate: p.HTTPRate, Size: p.Size, Warmup: p.Warmup, Duration: p.Duration}
	// The agents just started: settle them with an unmeasured run through
	// every server (up to 3 tries) before the measured one.
	warm := cfg
	warm.Warmup, warm.Duration = 0, time.Second
	for try := 1; try <= 3; try++ {
		res, err := r.work1(ctx, podPSClient, warm)
		if err == nil && res.Errors == 0 {
			break
		}
		if err == nil {
			err = fmt.Errorf("%d of %d requests failed, first: %s", res.Errors, res.Errors+res.Requests, res.FirstError)
		}
		r.log.Warn("per-pod agents' warm-up run had errors", "pods", n, "try", try, "err", err)
	}
	run := r.runOne(ctx, podPSClient, cfg, m.podAgentProcs())
	if run.Result == nil {
		return fmt.Errorf("%s%s", run.Error, r.podAgentLogTails(m))
	}
	if err := fillScalePoint(pt, run, func(u ProxyUsage) bool { return u.Name != "agent "+podPSClient }); err != nil {
		return fmt.Errorf("%w%s", err, r.podAgentLogTails(m))
	}
	return nil
}

// podAgentLogTails are the ends of the per-pod agents' logs, for errors.
func (r *runner) podAgentLogTails(m *mesh) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(m.pods)) {
		a := m.pods[k]
		data, err := os.ReadFile(a.Log)
		if err != nil || len(data) == 0 {
			continue
		}
		if len(data) > 600 {
			data = data[len(data)-600:]
		}
		fmt.Fprintf(&b, "\n--- agent %s log (%s) ---\n%s", k, a.Log, data)
	}
	return b.String()
}
