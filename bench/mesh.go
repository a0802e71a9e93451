package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	labmesh "github.com/nodemesh/nodemesh/lab/mesh"
)

// The benchmark's pods are in namespace mesh; the CA and the agents are
// started by lab/mesh, as the DaemonSet and the CA Deployment would run
// them, with the real binaries as lab node processes.
const meshNS = "mesh"

// mesh is a running nodemesh in the lab: lab/mesh's install with node
// agents on node-1 and node-2, and the per-pod agents of the sidecar-mode
// scenario.
type mesh struct {
	*labmesh.Mesh
	// accel is the agent's sk_msg acceleration status on node-1.
	accel       bool
	accelReason string
	// pods are the per-pod (sidecar mode) agents: pod key -> agent.
	pods map[string]*podAgent
}

// startMesh starts the CA and an agent on node-1 and node-2 (lab/mesh),
// without the access log (a line per connection is not what the
// benchmark measures), and waits until every mesh pod is captured and
// verified by its agent.
func (r *runner) startMesh(ctx context.Context) (*mesh, error) {
	if r.o.AgentBinary == "" || r.o.CABinary == "" {
		return nil, errors.New("no nodemesh-agent / nodemesh-ca binary given (build them with `make build` or `go build ./cmd/...`, then pass --agent-bin and --ca-bin)")
	}
	agent, ca, err := labmesh.FindBinaries(r.o.AgentBinary, r.o.CABinary)
	if err != nil {
		return nil, err
	}
	lm, err := labmesh.Start(ctx, r.lab, labmesh.Options{AgentBinary: agent, CABinary: ca, LogLevel: "warn",
		AgentNodes: []string{node1, node2}, NoAccessLog: true, Wait: 3 * time.Minute, Log: r.log})
	if err != nil {
		return nil, fmt.Errorf("starting nodemesh: %w", err)
	}
	m := &mesh{Mesh: lm, pods: map[string]*podAgent{}}
	if err := r.waitCaptured(ctx, m, meshPods(1)); err != nil {
		_ = lm.Stop(context.WithoutCancel(ctx))
		return nil, err
	}
	return m, nil
}

// agentGet fetches a path of node's agent admin API (inside the node).
func (r *runner) agentGet(ctx context.Context, node, path string, timeout time.Duration) ([]byte, error) {
	return r.mesh.Fetch(ctx, node, labmesh.AdminURL+path, timeout)
}

// profileAgents records a CPU profile of every agent for d while the
// caller runs a workload; wait returns the files written. With trace set
// it records a Go execution trace instead (`go tool trace FILE`), which
// shows what held the agent's Ps when a request waited.
func (r *runner) profileAgents(ctx context.Context, d time.Duration, dir, label string, trace bool) (wait func() []string) {
	secs := max(1, int(d/time.Second))
	endpoint, ext := "profile", "pprof"
	if trace {
		endpoint, ext = "trace", "trace"
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var files []string
	for node := range r.mesh.Agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := r.agentGet(ctx, node, fmt.Sprintf("/debug/pprof/%s?seconds=%d", endpoint, secs), d+time.Minute)
			if err != nil {
				r.log.Warn("profiling the agent failed", "node", node, "err", err)
				return
			}
			name := fmt.Sprintf("agent-%s-%s.%s", node, label, ext)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				r.log.Warn("creating the profile directory", "err", err)
				return
			}
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				r.log.Warn("writing a profile", "err", err)
				return
			}
			mu.Lock()
			files = append(files, name)
			mu.Unlock()
		}()
	}
	return func() []string {
		wg.Wait()
		sort.Strings(files)
		return files
	}
}

// waitCaptured waits until the agents report every one of pods (keys,
// with their nodes from the lab) as verified.
func (r *runner) waitCaptured(ctx context.Context, m *mesh, pods []string) error {
	want := map[string]map[string]bool{}
	for _, key := range pods {
		p, err := r.lab.Pod(key)
		if err != nil {
			return err
		}
		if want[p.Node] == nil {
			want[p.Node] = map[string]bool{}
		}
		want[p.Node][key] = true
	}
	deadline := time.Now().Add(3 * time.Minute)
	var last error
	for {
		last = nil
		for node, keys := range want {
			cd, err := m.Capture(ctx, node)
			if err != nil {
				last = err
				break
			}
			if node == node1 {
				m.accel, m.accelReason = cd.Acceleration, cd.AccelerationReason
			}
			got := map[string]string{}
			for _, p := range cd.Pods {
				got[p.Pod] = p.Status
				if p.Problem != "" {
					got[p.Pod] += " (" + p.Problem + ")"
				}
			}
			for k := range keys {
				if got[k] != "verified" {
					last = fmt.Errorf("agent on %s: pod %s is %q, not verified", node, k, got[k])
					break
				}
			}
			if last != nil {
				break
			}
		}
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for the agents to capture the mesh pods: %w%s", last, m.LogTails())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// stopMesh stops every agent and the CA (lab/mesh) and removes the
// per-pod scenario's node marks.
func (r *runner) stopMesh(m *mesh) {
	if m == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Stop(ctx); err != nil {
		r.log.Warn("stopping nodemesh", "err", err)
	}
	r.unmarkPodNodes(ctx)
	clear(m.pods)
}
