// Package mesh installs nodemesh into a running lab the way the DaemonSet
// and the CA Deployment would: the real nodemesh-ca binary as a process of
// the first node and the real nodemesh-agent binary as a process of every
// node, against the lab's kube-apiserver. Start waits until every agent is
// ready and has verified capture of every enrolled pod of its node (read
// from the agents' admin API); the Mesh then exposes each agent's admin
// API, log and access log, and Stop stops everything it started.
package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/lab"
)

// Names of what Start creates.
const (
	SystemNamespace = "nodemesh-system"
	AgentProcess    = "nodemesh-agent"
	CAProcess       = "nodemesh-ca"
	// AdminURL is where each agent serves its admin API, on its node's
	// loopback (reach it with Mesh.Get, which dials from inside the node).
	AdminURL = "http://127.0.0.1:15000"
	// ReadyURL is the agent's readiness probe, also inside the node.
	ReadyURL = "http://127.0.0.1:15021/healthz/ready"
	// MetricsURL is the agent's Prometheus endpoint, also inside the node.
	MetricsURL = "http://127.0.0.1:15020/metrics"
)

// Options configure Start.
type Options struct {
	AgentBinary, CABinary string // required: built nodemesh-agent and nodemesh-ca
	// AgentBinaries gives an agent another binary than AgentBinary, by
	// node (version skew tests run a previous release's agent on one).
	AgentBinaries map[string]string
	// LogLevel of the agents and the CA; default "info".
	LogLevel string
	// AgentNodes limits the agents to these nodes (a partial rollout, as
	// with the DaemonSet's nodemesh.io/agent=enabled node selector); nil
	// runs one on every node. The CA runs on the first agent node.
	AgentNodes []string
	// Wait bounds how long Start waits for readiness and capture; default 2m.
	Wait time.Duration
	// Kubeconfig gives an agent another kubeconfig than the lab's, by node
	// (the scale benchmark points one at a proxy that counts its API
	// traffic).
	Kubeconfig map[string]string
	// MarkDuration and MarkRenew set the agents' --node-mark-duration and
	// --node-mark-renew; zero keeps the agent's defaults (kubelet's node
	// lease values). Tests that wait for a killed agent's mark to expire
	// set short ones.
	MarkDuration, MarkRenew time.Duration
	// DrainDeadline and CRDRecheck set the agents' --drain-deadline and
	// --crd-recheck; defaults 2s and 2s.
	DrainDeadline, CRDRecheck time.Duration
	// SVIDTTL is the CA's --svid-ttl; default 1h (the CA refuses less
	// than a minute). Tests of an outage past expiry set a short one.
	SVIDTTL time.Duration
	// NoAccessLog starts the agents without --access-log (the throughput
	// benchmark measures without a log line per connection).
	NoAccessLog bool
	// AgentArgs are added to every agent's command line (e.g. tracing
	// flags).
	AgentArgs []string
	// AgentArgsByNode are added to one node's agent command line after
	// AgentArgs (per-node settings, such as the SPIRE agent socket of
	// --identity-source=spiffe-workload-api).
	AgentArgsByNode map[string][]string
	Log             *slog.Logger // progress; nil discards
}

// Agent is one node's running agent.
type Agent struct {
	Node string
	// Process is the agent's lab node process name (AgentProcess for the
	// node agents).
	Process string
	Pid     int
	// Log is the agent's stdout and stderr; with the access log on (Start
	// always turns it on) it is also the access log: one JSON line per
	// connection, msg "connection" or "connection refused".
	Log string
	// Pins is the agent's bpffs pin directory.
	Pins string
}

// Mesh is nodemesh running in a lab.
type Mesh struct {
	lab    *lab.Lab
	log    *slog.Logger
	CANode string
	CAAddr string // https://node-ip:port
	CALog  string
	Agents map[string]*Agent // by node
	// Enrolled lists the enrolled pods (namespace/name) by node, as found
	// when Start waited for capture.
	Enrolled map[string][]string

	opts   Options
	caArgv []string
	tokDir string
	// extra are the agents StartAgent started besides the node agents.
	extra []*Agent
}

// FindBinaries returns agent and ca if set, else nodemesh-agent and
// nodemesh-ca next to this executable (where `make build` puts them), and
// checks that they exist.
func FindBinaries(agent, ca string) (string, string, error) {
	if agent == "" || ca == "" {
		exe, err := os.Executable()
		if err != nil {
			return "", "", fmt.Errorf("finding this executable to locate the nodemesh binaries: %w", err)
		}
		dir := filepath.Dir(exe)
		if agent == "" {
			agent = filepath.Join(dir, "nodemesh-agent")
		}
		if ca == "" {
			ca = filepath.Join(dir, "nodemesh-ca")
		}
	}
	for _, b := range []string{agent, ca} {
		fi, err := os.Stat(b)
		if err != nil {
			return "", "", fmt.Errorf("nodemesh binary %s: %w (run `make build`, or pass its path)", b, err)
		}
		if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return "", "", fmt.Errorf("nodemesh binary %s is not an executable file", b)
		}
	}
	return agent, ca, nil
}

// Start installs the mesh into l and waits until it works. On error,
// everything already started is stopped again.
func Start(ctx context.Context, l *lab.Lab, o Options) (_ *Mesh, err error) {
	if o.AgentBinary == "" || o.CABinary == "" {
		return nil, errors.New("starting the mesh: the nodemesh-agent and nodemesh-ca binaries are required (see FindBinaries)")
	}
	if o.LogLevel == "" {
		o.LogLevel = "info"
	}
	if o.Wait == 0 {
		o.Wait = 2 * time.Minute
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.DrainDeadline <= 0 {
		o.DrainDeadline = 2 * time.Second
	}
	if o.CRDRecheck <= 0 {
		o.CRDRecheck = 2 * time.Second
	}
	nodes, err := agentNodes(l.Nodes(), o.AgentNodes)
	if err != nil {
		return nil, err
	}
	m := &Mesh{lab: l, log: o.Log, CANode: nodes[0].Name, Agents: map[string]*Agent{}, opts: o}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, m.LogTails())
			_ = m.Stop(context.WithoutCancel(ctx))
		}
	}()
	c := l.Server.Client
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: SystemNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("creating namespace %s: %w", SystemNamespace, err)
	}
	for _, sa := range []string{"nodemesh-agent", "nodemesh-ca"} {
		if _, err := c.CoreV1().ServiceAccounts(SystemNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("creating service account %s/%s: %w", SystemNamespace, sa, err)
		}
	}
	caHost := net.JoinHostPort(nodes[0].IP, fmt.Sprint(identity.DefaultPort))
	m.CAAddr = "https://" + caHost
	// The CA's pod object, as the Deployment's would be (host network
	// here), so that nodemeshctl finds it; it listens on every address of
	// its node, as a pod would on its own, so a port-forward reaches it.
	if err := m.registerPod(ctx, "nodemesh-ca-"+nodes[0].Name, nodes[0], "nodemesh-ca", "nodemesh-ca", "ca"); err != nil {
		return nil, err
	}
	if o.SVIDTTL <= 0 {
		o.SVIDTTL = time.Hour
	}
	m.caArgv = []string{o.CABinary, "--kubeconfig", l.Kubeconfig(),
		"--namespace", SystemNamespace, "--listen", net.JoinHostPort("", fmt.Sprint(identity.DefaultPort)), "--svid-ttl", o.SVIDTTL.String(), "--log-level", o.LogLevel}
	if err := m.StartCA(ctx); err != nil {
		return nil, err
	}
	tokDir := filepath.Join(l.StateDir(), "mesh")
	m.tokDir = tokDir
	if err := os.MkdirAll(tokDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", tokDir, err)
	}
	for _, n := range nodes {
		a, err := m.startAgent(ctx, n, o)
		if err != nil {
			return nil, err
		}
		m.Agents[n.Name] = a
		o.Log.Info("agent started", "node", n.Name, "pid", a.Pid)
	}
	wctx, cancel := context.WithTimeout(ctx, o.Wait)
	defer cancel()
	if err := m.WaitReady(wctx); err != nil {
		return nil, err
	}
	return m, nil
}

// agentNodes picks the nodes that get an agent: all, or the named subset
// (each must exist, at least one).
func agentNodes(all []lab.Node, subset []string) ([]lab.Node, error) {
	if len(all) == 0 {
		return nil, errors.New("starting the mesh: the lab has no nodes")
	}
	if subset == nil {
		return all, nil
	}
	var out []lab.Node
	for _, name := range subset {
		i := slices.IndexFunc(all, func(n lab.Node) bool { return n.Name == name })
		if i < 0 {
			return nil, fmt.Errorf("starting the mesh: agent node %q is not a node of the lab", name)
		}
		if !slices.ContainsFunc(out, func(n lab.Node) bool { return n.Name == name }) {
			out = append(out, all[i])
		}
	}
	if len(out) == 0 {
		return nil, errors.New("starting the mesh: AgentNodes is empty; give at least one node (nil means every node)")
	}
	return out, nil
}

// AgentSpec is an agent beside the node agents, for StartAgent.
type AgentSpec struct {
	Node string
	// Name names its pod object (nodemesh-agent-<Name>) and token; it must
	// not be a node's name.
	Name string
	// Process is its lab node process name; it must differ from
	// AgentProcess and from the other agents' on the node.
	Process string
	// CgroupRoot is its capture root; default the node's pod cgroup.
	CgroupRoot string
	// Args are more flags (--only-pod, the admin, metrics and readiness
	// addresses of an agent that shares its node with another).
	Args []string
}

// StartAgent starts one more agent on spec.Node, with the mesh's CA and
// options, as startAgent starts the node agents (the benchmark's per-pod
// agents). It does not wait for it; Stop stops it.
func (m *Mesh) StartAgent(ctx context.Context, spec AgentSpec) (*Agent, error) {
	if spec.Name == "" || spec.Process == "" || spec.Process == AgentProcess {
		return nil, fmt.Errorf("starting an extra agent: give it a name and a process name other than %q", AgentProcess)
	}
	n, err := m.lab.Node(spec.Node)
	if err != nil {
		return nil, err
	}
	a, err := m.startAgentAs(ctx, n, spec, m.opts)
	if err != nil {
		return nil, err
	}
	m.extra = append(m.extra, a)
	return a, nil
}

// startAgent starts node n's node agent.
func (m *Mesh) startAgent(ctx context.Context, n lab.Node, o Options) (*Agent, error) {
	return m.startAgentAs(ctx, n, AgentSpec{Node: n.Name, Name: n.Name, Process: AgentProcess}, o)
}

// startAgentAs registers the agent's pod (hostNetwork, as the DaemonSet's
// would be), mints its CA token bound to that pod, and starts the agent in
// the node's namespace with the node's pod cgroup (or spec's) as its
// capture root.
func (m *Mesh) startAgentAs(ctx context.Context, n lab.Node, spec AgentSpec, o Options) (*Agent, error) {
	c := m.lab.Server.Client
	name := "nodemesh-agent-" + spec.Name
	if err := m.registerPod(ctx, name, n, "nodemesh-agent", "nodemesh-agent", "agent"); err != nil {
		return nil, err
	}
	p, err := c.CoreV1().Pods(SystemNamespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading the agent pod object for %s: %w", spec.Name, err)
	}
	exp := int64(3600)
	tr, err := c.CoreV1().ServiceAccounts(SystemNamespace).CreateToken(ctx, "nodemesh-agent", &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{identity.Audience}, ExpirationSeconds: &exp,
		BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("requesting the CA token of agent %s on %s: %w", spec.Name, n.Name, err)
	}
	tok := filepath.Join(m.tokDir, "token-"+spec.Name)
	if err := os.WriteFile(tok, []byte(tr.Status.Token), 0o600); err != nil {
		return nil, fmt.Errorf("writing the agent token: %w", err)
	}
	pins := filepath.Join(m.lab.BPFDir(), "mesh-agent-"+spec.Name)
	kc := m.lab.Kubeconfig()
	if k := o.Kubeconfig[n.Name]; k != "" {
		kc = k
	}
	cg := n.Cgroup
	if spec.CgroupRoot != "" {
		cg = spec.CgroupRoot
	}
	bin := o.AgentBinary
	if b := o.AgentBinaries[n.Name]; b != "" {
		bin = b
	}
	args := []string{bin,
		"--node-name", n.Name, "--kubeconfig", kc, "--ca-addr", m.CAAddr,
		"--ca-token-file", tok, "--cgroup-root", cg, "--bpf-pin-dir", pins,
		"--drain-deadline", o.DrainDeadline.String(), "--log-level", o.LogLevel, "--crd-recheck", o.CRDRecheck.String()}
	if !o.NoAccessLog {
		args = append(args, "--access-log")
	}
	args = append(args, o.AgentArgs...)
	args = append(args, o.AgentArgsByNode[n.Name]...)
	if o.MarkDuration > 0 {
		args = append(args, "--node-mark-duration", o.MarkDuration.String())
	}
	if o.MarkRenew > 0 {
		args = append(args, "--node-mark-renew", o.MarkRenew.String())
	}
	args = append(args, spec.Args...)
	proc, err := m.lab.StartNodeProcess(ctx, n.Name, spec.Process, args, nil)
	if err != nil {
		return nil, fmt.Errorf("starting agent %s on %s: %w", spec.Name, n.Name, err)
	}
	return &Agent{Node: n.Name, Process: spec.Process, Pid: proc.Pid, Log: proc.Log, Pins: pins}, nil
}

// RestartAgent stops node's agent and starts it again, as a rolling
// DaemonSet update would. It does not wait for the new agent: callers
// time how long it takes to become ready (Ready).
func (m *Mesh) RestartAgent(ctx context.Context, node string) error {
	if _, ok := m.Agents[node]; !ok {
		return fmt.Errorf("restarting the agent on %s: no agent runs there", node)
	}
	if err := m.lab.StopNodeProcess(ctx, node, AgentProcess, 10*time.Second); err != nil {
		return fmt.Errorf("stopping the agent on %s: %w", node, err)
	}
	_, err := m.StartNodeAgent(ctx, node)
	return err
}

// SetAgentBinary makes the next StartNodeAgent on node run bin (an
// upgrade or downgrade of that node's agent); "" means Options.AgentBinary.
func (m *Mesh) SetAgentBinary(node, bin string) {
	if m.opts.AgentBinaries == nil {
		m.opts.AgentBinaries = map[string]string{}
	}
	m.opts.AgentBinaries[node] = bin
}

// StartNodeAgent starts node's agent again after it was stopped or killed
// (the caller made sure the old process is gone, e.g. with
// lab.StopNodeProcess), with the options Start had. It does not wait.
func (m *Mesh) StartNodeAgent(ctx context.Context, node string) (*Agent, error) {
	n, err := m.lab.Node(node)
	if err != nil {
		return nil, err
	}
	delete(m.Agents, node)
	a, err := m.startAgent(ctx, n, m.opts)
	if err != nil {
		return nil, err
	}
	m.Agents[node] = a
	return a, nil
}

// registerPod creates the Running host-network pod object of a mesh
// process on node n (unless it exists), labelled as the manifests label
// theirs (app.kubernetes.io/name=app), as kubelet would publish it.
func (m *Mesh) registerPod(ctx context.Context, name string, n lab.Node, app, sa, component string) error {
	pods := m.lab.Server.Client.CoreV1().Pods(SystemNamespace)
	if _, err := pods.Get(ctx, name, metav1.GetOptions{}); err == nil {
		return nil
	}
	p, err := pods.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name,
		Labels: map[string]string{"app.kubernetes.io/name": app, "app.kubernetes.io/component": component}},
		Spec: corev1.PodSpec{NodeName: n.Name, ServiceAccountName: sa, HostNetwork: true,
			Containers: []corev1.Container{{Name: component, Image: app}}}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating the pod object %s on %s: %w", name, n.Name, err)
	}
	p.Status.Phase = corev1.PodRunning
	p.Status.HostIP, p.Status.PodIP = n.IP, n.IP
	p.Status.PodIPs = []corev1.PodIP{{IP: n.IP}}
	if _, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("marking the pod %s on %s running: %w", name, n.Name, err)
	}
	return nil
}

// Get fetches path from node's agent admin API (dialling from inside the
// node's network namespace) and returns the body of a 200 answer.
func (m *Mesh) Get(ctx context.Context, node, path string) ([]byte, error) {
	return m.get(ctx, node, AdminURL+path)
}

// Metrics fetches node's agent's Prometheus metrics (text format).
func (m *Mesh) Metrics(ctx context.Context, node string) ([]byte, error) {
	return m.get(ctx, node, MetricsURL)
}

func (m *Mesh) get(ctx context.Context, node, u string) ([]byte, error) {
	return m.Fetch(ctx, node, u, 15*time.Second)
}

// Fetch GETs u from inside node's network namespace (an agent's admin,
// metrics or readiness address there) within timeout and returns the body
// of a 200 answer (at most 64 MiB: a CPU profile fits).
func (m *Mesh) Fetch(ctx context.Context, node, u string, timeout time.Duration) ([]byte, error) {
	n, err := m.lab.Node(node)
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
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("building the request for %s: %w", u, err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("agent on %s, GET %s: %w", node, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("agent on %s, reading %s: %w", node, u, err)
	}
	if resp.StatusCode != http.StatusOK {
		return b, fmt.Errorf("agent on %s, GET %s: %s: %s", node, u, resp.Status, strings.TrimSpace(truncate(string(b), 300)))
	}
	return b, nil
}

// CapturedPod is one pod of an agent's /config_dump/capture.
type CapturedPod struct {
	Pod     string `json:"pod"`
	Status  string `json:"status"` // enrolled, verified or failed
	Problem string `json:"problem"`
}

// CaptureStatus is an agent's /config_dump/capture.
type CaptureStatus struct {
	Pods               []CapturedPod `json:"pods"`
	Acceleration       bool          `json:"acceleration"`
	AccelerationReason string        `json:"accelerationReason"`
}

// Capture returns node's agent capture status.
func (m *Mesh) Capture(ctx context.Context, node string) (*CaptureStatus, error) {
	b, err := m.Get(ctx, node, "/config_dump/capture")
	if err != nil {
		return nil, err
	}
	var cs CaptureStatus
	if err := json.Unmarshal(b, &cs); err != nil {
		return nil, fmt.Errorf("decoding the capture status of the agent on %s: %w", node, err)
	}
	return &cs, nil
}

// Ready checks node's agent readiness probe.
func (m *Mesh) Ready(ctx context.Context, node string) error {
	_, err := m.get(ctx, node, ReadyURL)
	return err
}

// EnrolledPods lists, by node, the lab pods the API server says are in
// the mesh: their namespace is labelled nodemesh.io/mode=enabled and the
// pod does not opt out with nodemesh.io/mode=disabled.
func (m *Mesh) EnrolledPods(ctx context.Context) (map[string][]string, error) {
	c := m.lab.Server.Client
	nss, err := c.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("listing namespaces: %w", err)
	}
	enrolled := map[string]bool{}
	for _, ns := range nss.Items {
		enrolled[ns.Name] = ns.Labels[state.LabelMode] == state.ModeEnabled
	}
	out := map[string][]string{}
	for _, p := range m.lab.Pods() {
		if !enrolled[p.Namespace] {
			continue
		}
		kp, err := c.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("reading pod %s: %w", p.Key(), err)
		}
		if kp.Labels[state.LabelMode] == state.ModeDisabled {
			continue
		}
		out[p.Node] = append(out[p.Node], p.Key())
	}
	for _, keys := range out {
		sort.Strings(keys)
	}
	return out, nil
}

// WaitReady waits until every agent is ready, reports every enrolled pod
// of its node as verified (and no other pod as captured), and sees every
// other agent's node mark.
func (m *Mesh) WaitReady(ctx context.Context) error {
	var last error
	for {
		last = m.checkReady(ctx)
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the mesh to be ready: %w (last: %w)", ctx.Err(), last)
		case <-time.After(300 * time.Millisecond):
		}
	}
}

func (m *Mesh) checkReady(ctx context.Context) error {
	for node, a := range m.Agents {
		if !m.lab.Running(lab.Process{Pid: a.Pid}) {
			return fmt.Errorf("the agent on %s (pid %d) exited; see %s", node, a.Pid, a.Log)
		}
	}
	want, err := m.EnrolledPods(ctx)
	if err != nil {
		return err
	}
	for node := range m.Agents {
		if err := m.Ready(ctx, node); err != nil {
			return err
		}
		cs, err := m.Capture(ctx, node)
		if err != nil {
			return err
		}
		got := map[string]CapturedPod{}
		for _, p := range cs.Pods {
			got[p.Pod] = p
		}
		for _, k := range want[node] {
			p, ok := got[k]
			if !ok {
				return fmt.Errorf("agent on %s: enrolled pod %s is not captured yet", node, k)
			}
			if p.Status != "verified" {
				return fmt.Errorf("agent on %s: pod %s is %q, not verified %s", node, k, p.Status, p.Problem)
			}
			delete(got, k)
		}
		for k := range got {
			return fmt.Errorf("agent on %s captures %s, which is not enrolled", node, k)
		}
	}
	if err := m.checkMarks(ctx); err != nil {
		return err
	}
	m.Enrolled = want
	return nil
}

// checkMarks: every node agent sees every other node agent's node mark as
// fresh. An agent becomes ready, then writes its mark, and its peers learn
// of it from their watch: until then they treat its node as unmeshed and
// send its PERMISSIVE pods plaintext (docs/rollout.md). A mesh is ready
// for a test once that has settled. Agents without a rollout section (no
// API server) are skipped.
func (m *Mesh) checkMarks(ctx context.Context) error {
	for node := range m.Agents {
		b, err := m.Get(ctx, node, "/config_dump/rollout")
		if err != nil {
			if strings.Contains(err.Error(), "404 Not Found") {
				continue
			}
			return err
		}
		var d struct {
			Synced bool `json:"synced"`
			Marks  []struct {
				Node  string `json:"node"`
				Fresh bool   `json:"meshCapable"`
			} `json:"marks"`
		}
		if err := json.Unmarshal(b, &d); err != nil {
			return fmt.Errorf("decoding the rollout dump of the agent on %s: %w", node, err)
		}
		if !d.Synced {
			return fmt.Errorf("agent on %s has not listed the node marks yet", node)
		}
		fresh := map[string]bool{}
		for _, mk := range d.Marks {
			fresh[mk.Node] = mk.Fresh
		}
		for other := range m.Agents {
			if other != node && !fresh[other] {
				return fmt.Errorf("agent on %s does not see %s's node mark yet", node, other)
			}
		}
	}
	return nil
}

// AccessRecord is one line of an agent's access log.
type AccessRecord struct {
	Msg           string  `json:"msg"`
	Reporter      string  `json:"reporter"` // source or destination
	Src           string  `json:"src"`
	Dst           string  `json:"dst"`
	SrcWorkload   string  `json:"src_workload"`
	SrcNamespace  string  `json:"src_namespace"`
	SrcSPIFFEID   string  `json:"src_spiffe_id"`
	DstWorkload   string  `json:"dst_workload"`
	DstNamespace  string  `json:"dst_namespace"`
	DstSPIFFEID   string  `json:"dst_spiffe_id"`
	DstService    string  `json:"dst_service"`
	Security      string  `json:"security"`
	BytesSent     int64   `json:"bytes_sent"`
	BytesReceived int64   `json:"bytes_received"`
	DurationMS    float64 `json:"duration_ms"`
	CloseReason   string  `json:"close_reason"`
	// Line is the record as written.
	Line string `json:"-"`
}

// AccessLog returns the access-log records in node's agent log (lines
// with msg "connection" or "connection refused"), oldest first.
func (m *Mesh) AccessLog(node string) ([]AccessRecord, error) {
	a, ok := m.Agents[node]
	if !ok {
		return nil, fmt.Errorf("no agent on node %q", node)
	}
	b, err := os.ReadFile(a.Log)
	if err != nil {
		return nil, fmt.Errorf("reading the agent log on %s: %w", node, err)
	}
	var out []AccessRecord
	for line := range strings.SplitSeq(string(b), "\n") {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var r AccessRecord
		if json.Unmarshal([]byte(line), &r) != nil || !strings.HasPrefix(r.Msg, "connection") {
			continue
		}
		r.Line = line
		out = append(out, r)
	}
	return out, nil
}

// ExplainQuery is a live policy explain question (the flags of
// `nodemeshctl policy explain --agent`).
type ExplainQuery struct {
	Src, Dst  string // namespace/pod or IP
	Port      int
	Principal string // source SPIFFE ID; "" = derived
	Plaintext bool
	Direction string // both, ingress or egress; "" = both
}

// Explain asks node's agent (GET /policy/explain) why q would be allowed
// or denied, on the policy snapshot the agent enforces.
func (m *Mesh) Explain(ctx context.Context, node string, q ExplainQuery) (*policy.Decision, error) {
	v := url.Values{}
	v.Set("src", q.Src)
	v.Set("dst", q.Dst)
	v.Set("port", fmt.Sprint(q.Port))
	v.Set("protocol", "TCP")
	dir := q.Direction
	if dir == "" {
		dir = "both"
	}
	v.Set("direction", dir)
	if q.Principal != "" {
		v.Set("principal", q.Principal)
	}
	if q.Plaintext {
		v.Set("plaintext", "true")
	}
	b, err := m.Get(ctx, node, "/policy/explain?"+v.Encode())
	if err != nil {
		return nil, err
	}
	var d policy.Decision
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("decoding the explain answer of the agent on %s: %w", node, err)
	}
	if d.Verdict != policy.Allow && d.Verdict != policy.Deny {
		return nil, fmt.Errorf("the agent on %s answered an unknown verdict %q", node, d.Verdict)
	}
	return &d, nil
}

// Stop stops the agents (SIGTERM, then their cgroups are killed) and the
// CA. It is safe to call more than once.
func (m *Mesh) Stop(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var errs []error
	for _, a := range m.extra {
		if err := m.lab.StopNodeProcess(ctx, a.Node, a.Process, 5*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("stopping agent %s on %s: %w", a.Process, a.Node, err))
		}
	}
	m.extra = nil
	nodes := make([]string, 0, len(m.Agents))
	for node := range m.Agents {
		nodes = append(nodes, node)
	}
	sort.Strings(nodes)
	for _, node := range nodes {
		if err := m.lab.StopNodeProcess(ctx, node, AgentProcess, 10*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("stopping the agent on %s: %w", node, err))
		}
		delete(m.Agents, node)
	}
	if m.CALog != "" {
		if err := m.lab.StopNodeProcess(ctx, m.CANode, CAProcess, 5*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("stopping the CA: %w", err))
		}
		m.CALog = ""
	}
	return errors.Join(errs...)
}

// StartCA starts the CA process (Start does; after StopCA, again). Its
// root is kept in a Secret, so a restarted CA signs under the same root.
func (m *Mesh) StartCA(ctx context.Context) error {
	ca, err := m.lab.StartNodeProcess(ctx, m.CANode, CAProcess, m.caArgv, nil)
	if err != nil {
		return fmt.Errorf("starting the nodemesh CA on %s: %w", m.CANode, err)
	}
	m.CALog = ca.Log
	m.log.Info("CA started", "node", m.CANode, "addr", m.CAAddr, "pid", ca.Pid)
	return nil
}

// StopCA stops the CA process (an outage of every CA replica).
func (m *Mesh) StopCA(ctx context.Context) error {
	if err := m.lab.StopNodeProcess(ctx, m.CANode, CAProcess, 5*time.Second); err != nil {
		return fmt.Errorf("stopping the CA: %w", err)
	}
	m.CALog = ""
	return nil
}

// LogTails returns the ends of the agent and CA logs, for errors.
func (m *Mesh) LogTails() string {
	var b strings.Builder
	logs := map[string]string{}
	if m.CALog != "" {
		logs["CA"] = m.CALog
	}
	for node, a := range m.Agents {
		logs["agent on "+node] = a.Log
	}
	for _, a := range m.extra {
		logs[a.Process+" on "+a.Node] = a.Log
	}
	for who, path := range logs {
		data, err := os.ReadFile(path)
		if err != nil || len(data) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\n--- %s (%s) ---\n%s", who, path, truncateHead(string(data), 1500))
	}
	return b.String()
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

func truncateHead(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
