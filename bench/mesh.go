package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/identity"
)

// The nodemesh install the benchmark makes in its lab: what the
// DaemonSet and the CA Deployment would create, with the real binaries
// run as lab node processes against the lab's kube-apiserver.
const (
	meshSystemNS = "nodemesh-system"
	meshNS       = "mesh"
	agentProc    = "nodemesh-agent"
	caProc       = "nodemesh-ca"
	agentAdmin   = "http://127.0.0.1:15000"
)

// mesh is a running nodemesh in the lab.
type mesh struct {
	agents map[string]int // node -> agent pid
	logs   map[string]string
	// accel is the agent's sk_msg acceleration status on node-1.
	accel       bool
	accelReason string
	// caURL is the CA's address for agents started later.
	caURL string
	// pods are the per-pod (sidecar mode) agents: pod key -> agent.
	pods map[string]*podAgent
}

// startMesh starts the CA on node-1 and an agent on each node, and waits
// until every mesh pod is captured and verified by its agent.
func (r *runner) startMesh(ctx context.Context) (*mesh, error) {
	if r.o.AgentBinary == "" || r.o.CABinary == "" {
		return nil, errors.New("no nodemesh-agent / nodemesh-ca binary given (build them with `make build` or `go build ./cmd/...`, then pass --agent-bin and --ca-bin)")
	}
	for _, b := range []string{r.o.AgentBinary, r.o.CABinary} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("nodemesh binary %s: %w (build it with `go build ./cmd/...` or pass its path)", b, err)
		}
	}
	c := r.lab.Server.Client
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meshSystemNS}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("creating namespace %s: %w", meshSystemNS, err)
	}
	for _, sa := range []string{"nodemesh-agent", "nodemesh-ca"} {
		if _, err := c.CoreV1().ServiceAccounts(meshSystemNS).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("creating service account %s: %w", sa, err)
		}
	}
	n1, err := r.lab.Node(node1)
	if err != nil {
		return nil, err
	}
	caAddr := net.JoinHostPort(n1.IP, fmt.Sprint(identity.DefaultPort))
	m := &mesh{agents: map[string]int{}, logs: map[string]string{}, caURL: "https://" + caAddr, pods: map[string]*podAgent{}}
	ca, err := r.lab.StartNodeProcess(ctx, node1, caProc, []string{r.o.CABinary, "--kubeconfig", r.lab.Kubeconfig(),
		"--namespace", meshSystemNS, "--listen", caAddr, "--svid-ttl", "1h", "--log-level", "warn"}, nil)
	if err != nil {
		return nil, fmt.Errorf("starting the nodemesh CA: %w", err)
	}
	m.logs["ca"] = ca.Log
	for _, node := range []string{node1, node2} {
		pid, log, err := r.startAgent(ctx, node, node, agentProc, m.caURL, []string{
			"--cgroup-root", "", "--bpf-pin-dir", filepath.Join(r.lab.BPFDir(), "bench-agent-"+node)})
		if err != nil {
			return m, err
		}
		m.agents[node], m.logs[node] = pid, log
	}
	if err := r.waitCaptured(ctx, m, meshPods(1)); err != nil {
		return m, err
	}
	return m, nil
}

// startAgent registers the agent's pod nodemesh-agent-<id> (hostNetwork,
// as the DaemonSet's would be), mints its CA token bound to that pod, and
// starts the agent as node process proc in the node's namespace with
// extra flags. A "--cgroup-root" of "" in extra is the node's pod cgroup
// (the node agent's capture root).
func (r *runner) startAgent(ctx context.Context, node, id, proc, caURL string, extra []string) (int, string, error) {
	c := r.lab.Server.Client
	name := "nodemesh-agent-" + id
	p, err := c.CoreV1().Pods(meshSystemNS).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		p, err = c.CoreV1().Pods(meshSystemNS).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "nodemesh-agent", HostNetwork: true,
				Containers: []corev1.Container{{Name: "agent", Image: "nodemesh-agent"}}}}, metav1.CreateOptions{})
		if err != nil {
			return 0, "", fmt.Errorf("creating the agent pod object for %s: %w", node, err)
		}
		p.Status.Phase = corev1.PodRunning
		if p, err = c.CoreV1().Pods(meshSystemNS).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			return 0, "", fmt.Errorf("marking the agent pod on %s running: %w", node, err)
		}
	}
	exp := int64(3600)
	tr, err := c.CoreV1().ServiceAccounts(meshSystemNS).CreateToken(ctx, "nodemesh-agent", &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{identity.Audience}, ExpirationSeconds: &exp,
		BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		return 0, "", fmt.Errorf("requesting the agent's CA token on %s: %w", node, err)
	}
	tok := filepath.Join(r.work, "token-"+id)
	if err := os.WriteFile(tok, []byte(tr.Status.Token), 0o600); err != nil {
		return 0, "", fmt.Errorf("writing the agent token: %w", err)
	}
	n, err := r.lab.Node(node)
	if err != nil {
		return 0, "", err
	}
	args := []string{r.o.AgentBinary,
		"--node-name", node, "--kubeconfig", r.lab.Kubeconfig(), "--ca-addr", caURL,
		"--ca-token-file", tok, "--drain-deadline", "2s", "--log-level", "warn"}
	for i := 0; i < len(extra); i++ {
		if extra[i] == "--cgroup-root" && i+1 < len(extra) && extra[i+1] == "" {
			args = append(args, extra[i], n.Cgroup)
			i++
			continue
		}
		args = append(args, extra[i])
	}
	p2, err := r.lab.StartNodeProcess(ctx, node, proc, args, nil)
	if err != nil {
		return 0, "", fmt.Errorf("starting agent %s on %s: %w", id, node, err)
	}
	return p2.Pid, p2.Log, nil
}

// captureDump is the agent's /config_dump/capture section.
type captureDump struct {
	Pods []struct {
		Pod     string `json:"pod"`
		Status  string `json:"status"`
		Problem string `json:"problem"`
	} `json:"pods"`
	Acceleration       bool   `json:"acceleration"`
	AccelerationReason string `json:"accelerationReason"`
}

// agentGet fetches a path of the agent's admin API, which listens on the
// node's loopback, from inside the node's network namespace.
func (r *runner) agentGet(ctx context.Context, node, path string, timeout time.Duration, limit int64) ([]byte, error) {
	return r.agentGetAt(ctx, node, agentAdmin, path, timeout, limit)
}

// agentGetAt is agentGet for an agent whose admin API is at base.
func (r *runner) agentGetAt(ctx context.Context, node, base, path string, timeout time.Duration, limit int64) ([]byte, error) {
	n, err := r.lab.Node(node)
	if err != nil {
		return nil, err
	}
	d := &inpod.Dialer{Netns: n.Netns}
	hc := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("agent admin API %s on %s, %s: %w", base, node, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, limit))
	if err != nil {
		return nil, fmt.Errorf("agent admin API %s on %s, reading %s: %w", base, node, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("agent admin API %s on %s, %s: %s: %s", base, node, path, resp.Status, truncate(string(b), 200))
	}
	return b, nil
}

// profileAgents records a CPU profile of every agent for d while the
// caller runs a workload; wait returns the files written.
func (r *runner) profileAgents(ctx context.Context, d time.Duration, dir, label string) (wait func() []string) {
	secs := max(1, int(d/time.Second))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var files []string
	for node := range r.mesh.agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := r.agentGet(ctx, node, fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), d+time.Minute, 64<<20)
			if err != nil {
				r.log.Warn("profiling the agent failed", "node", node, "err", err)
				return
			}
			name := fmt.Sprintf("agent-%s-%s.pprof", node, label)
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

func (r *runner) agentCapture(ctx context.Context, node string) (*captureDump, error) {
	b, err := r.agentGet(ctx, node, "/config_dump/capture", 5*time.Second, 4<<20)
	if err != nil {
		return nil, err
	}
	var cd captureDump
	if err := json.Unmarshal(b, &cd); err != nil {
		return nil, fmt.Errorf("decoding the agent's capture status on %s: %w", node, err)
	}
	return &cd, nil
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
			cd, err := r.agentCapture(ctx, node)
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
			return fmt.Errorf("waiting for the agents to capture the mesh pods: %w%s", last, r.agentLogTails(m))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (r *runner) agentLogTails(m *mesh) string {
	var b strings.Builder
	for who, path := range m.logs {
		data, err := os.ReadFile(path)
		if err != nil || len(data) == 0 {
			continue
		}
		if len(data) > 600 {
			data = data[len(data)-600:]
		}
		fmt.Fprintf(&b, "\n--- %s log (%s) ---\n%s", who, path, data)
	}
	return b.String()
}

func (r *runner) stopMesh(m *mesh) {
	if m == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r.stopPodAgents(ctx, m)
	for node := range m.agents {
		_ = r.lab.StopNodeProcess(ctx, node, agentProc, 5*time.Second)
	}
	_ = r.lab.StopNodeProcess(ctx, node1, caProc, 5*time.Second)
}
