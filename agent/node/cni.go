package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nodemesh/nodemesh/agent/cni"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/workloads"
)

// cniPoll is how often a CNI request checks the cluster state and the data
// plane while it waits.
const cniPoll = 20 * time.Millisecond

// EnrollPod is the CNI plugin's ADD (agent/cni): it waits until the
// cluster state has the pod, reports its sandbox to the Locator, wakes the
// reconcile loop, and returns once the data plane serves the pod captured
// from that sandbox. The enrollment itself is the loop's, as for every
// other pod (workloads.Plan, Dataplane.Apply): there is no second path.
func (m *mesh) EnrollPod(ctx context.Context, sb cni.Sandbox) (result, reason string, err error) {
	owned := true
	defer func() {
		if owned {
			sb.Netns.Close()
		}
	}()
	key := state.Key{Namespace: sb.Namespace, Name: sb.Name}
	p, err := m.waitPod(ctx, key, sb.UID)
	if err != nil {
		return "", "", err
	}
	if why, err := m.cniSkip(p, sb); why != "" || err != nil {
		if err != nil {
			return "", "", err
		}
		return cni.ResultSkipped, why, nil
	}
	sb.UID = p.UID()
	rep := m.reported.Put(workloads.Report{UID: sb.UID, Namespace: sb.Namespace, Name: sb.Name,
		ContainerID: sb.ContainerID, IPs: sb.IPs}, sb.Netns, sb.Netns.Fd())
	owned = false
	m.wakeForCNI()
	tick := time.NewTicker(cniPoll)
	defer tick.Stop()
	problem := "not enrolled yet"
	for {
		if s, ok := m.dp.Served()[key]; ok && s.Pod.UID() == sb.UID && s.Pod.Netns() == rep.Netns {
			if s.Captured && !s.Failed {
				m.waitSVID(ctx, s.Pod)
				return cni.ResultEnrolled, "", nil
			}
			problem = "its capture failed (the agent retries; see its log and nodemeshctl check)"
		}
		select {
		case <-ctx.Done():
			return "", "", fmt.Errorf("pod %s not captured in time: %s: %w", key, problem, ctx.Err())
		case <-tick.C:
		}
	}
}

// svidWait bounds how long a captured pod's sandbox waits for the pod's
// SVID: its tunnels fail closed until the SVID is there, and its app may
// be Ready a second after it starts, but a CA outage must not stop pods
// from starting (capture is in place either way).
const svidWait = 5 * time.Second

// waitSVID waits up to svidWait until the pod's SVID is there.
func (m *mesh) waitSVID(ctx context.Context, p *state.Pod) {
	ctx, cancel := context.WithTimeout(ctx, svidWait)
	defer cancel()
	tick := time.NewTicker(cniPoll)
	defer tick.Stop()
	for {
		if _, err := m.svids.SVIDSource(p.Identity).GetX509SVID(); err == nil {
			return
		}
		select {
		case <-ctx.Done():
			m.log.Warn("pod starts before its SVID is there; its tunnels fail closed until it is", "pod", p.Key().String(), "spiffe_id", p.Identity.String(), "hint", m.svidHint)
			return
		case <-tick.C:
		}
	}
}

// Forget is the CNI plugin's DEL.
func (m *mesh) Forget(uid, namespace, name, containerID string) {
	m.reported.Forget(uid, containerID)
	m.wakeForCNI()
}

func (m *mesh) wakeForCNI() {
	select {
	case m.cniWake <- struct{}{}:
	default:
	}
}

// waitPod waits until the cluster state is synced and has the pod with
// this UID: kubelet may create the sandbox before this agent's watch has
// delivered the pod.
func (m *mesh) waitPod(ctx context.Context, key state.Key, uid string) (*state.Pod, error) {
	tick := time.NewTicker(cniPoll)
	defer tick.Stop()
	start := time.Now()
	for {
		snap := m.n.store.Snapshot()
		var seen string
		if snap.Synced() {
			p := snap.Pod(key.Namespace, key.Name)
			if p != nil && (p.UID() == uid || uid == "" && !p.Terminating) {
				return p, nil
			}
			if p != nil {
				seen = " (the state has uid " + p.UID() + " under that name)"
			}
		}
		select {
		case <-ctx.Done():
			if !snap.Synced() {
				return nil, fmt.Errorf("the agent's cluster state is not synced yet after %s; pod %s waits: %w", time.Since(start).Round(time.Millisecond), key, ctx.Err())
			}
			return nil, fmt.Errorf("pod %s uid %s not in the agent's cluster state after %s%s: %w", key, uid, time.Since(start).Round(time.Millisecond), seen, ctx.Err())
		case <-tick.C:
		}
	}
}

// errNoAddress: a pod to mesh with no address, neither in the API nor in
// the previous plugin's result.
var errNoAddress = errors.New("no pod address in the CNI result (is nodemesh-cni chained after the network plugin?)")

// cniSkip says why the agent does not mesh p (""), or why it cannot
// enroll it from this sandbox.
func (m *mesh) cniSkip(p *state.Pod, sb cni.Sandbox) (string, error) {
	switch {
	case p.Node != m.filter.Node:
		return "", fmt.Errorf("pod %s is on node %q in the cluster state, not on this agent's node %q", p.Key(), p.Node, m.filter.Node)
	case p.HostNetwork:
		return "host network", nil
	case !p.Enrolled:
		return "not in the mesh (its namespace is not enrolled, or it opted out)", nil
	case !p.Live():
		return "the pod has finished", nil
	case p.Terminating:
		return "the pod is terminating", nil
	case p.Identity.IsZero():
		return "", fmt.Errorf("pod %s has no SPIFFE identity (no service account?)", p.Key())
	}
	q := *p
	q.SetLocation("(reported)", q.Cgroup())
	if len(q.IPs) == 0 {
		q.IPs = sb.IPs
	}
	if len(q.IPs) == 0 {
		return "", fmt.Errorf("pod %s: %w", p.Key(), errNoAddress)
	}
	if !m.filter.Wanted(&q) {
		return "not served by this agent (--only-pod)", nil
	}
	return "", nil
}
