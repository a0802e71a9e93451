package cluster_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/lab/cluster"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/workload"
)

const demoNS = "demo"

// netpol: STRICT mTLS in demo, and only the client may reach the server.
const netpol = `apiVersion: security.nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: demo
spec:
  mtls:
    mode: STRICT
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: server-from-client
  namespace: demo
spec:
  podSelector:
    matchLabels: {app: server}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchLabels: {app: client}
      ports:
        - {port: 8080}
`

// get runs the workload's HTTP GET in pod ns/name with kubectl exec and
// returns the server's reply, or the error (with the output).
func get(ctx context.Context, c *cluster.Cluster, ns, pod, url string) (workload.Reply, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := c.Kubectl(ctx, "-n", ns, "exec", pod, "--", "/usr/local/bin/nodemeshctl", "lab", "workload", "get", "--timeout", "5s", url).CombinedOutput()
	var r workload.Reply
	if err != nil {
		return r, fmt.Errorf("GET %s from %s/%s: %w: %s", url, ns, pod, err, strings.TrimSpace(string(out)))
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return r, fmt.Errorf("GET %s from %s/%s: decoding %q: %w", url, ns, pod, out, err)
	}
	return r, nil
}

// metrics returns node n's agent metrics, from 127.0.0.1:15020 inside the
// node (the agent answers only the node itself there).
func metrics(ctx context.Context, n *cluster.Node) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, network, addr string) (conn net.Conn, err error) {
		if nerr := netns.Do(n.Netns, func() error {
			conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return nil
		}); nerr != nil {
			return nil, nerr
		}
		return conn, err
	}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:15020/metrics", nil)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// metricValue sums the samples of name whose labels contain every one of
// labels (`key="value"` strings).
func metricValue(text, name string, labels ...string) float64 {
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// capturedAt waits until node n's agent reports pod ns/name's capture
// verified and returns when it first saw it so.
func capturedAt(t *testing.T, ctx context.Context, n *cluster.Node, ns, name string) time.Time {
	t.Helper()
	var last string
	err := poll(ctx, 60*time.Second, func() (bool, string) {
		m, err := metrics(ctx, n)
		if err != nil {
			return false, err.Error()
		}
		last = m
		return metricValue(m, "nodemesh_capture_status", `namespace="`+ns+`"`, `pod="`+name+`"`, `status="verified"`) == 1,
			"capture of " + ns + "/" + name + " not verified on " + n.Name
	})
	if err != nil {
		var lines []string
		for _, l := range strings.Split(last, "\n") {
			if strings.HasPrefix(l, "nodemesh_capture_status") {
				lines = append(lines, l)
			}
		}
		t.Fatalf("%v\n%s", err, strings.Join(lines, "\n"))
	}
	return time.Now()
}

// readyAt returns when pod's Ready condition last turned true.
func readyAt(p *corev1.Pod) time.Time {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return c.LastTransitionTime.Time
		}
	}
	return time.Time{}
}

// meshed checks a reply came through the agents: the server saw the
// client's own pod IP, on a socket carrying the agent's delivery mark (or,
// on kernels before 5.17, its own IP: demo.CheckDelivered).
func meshed(r workload.Reply, client *corev1.Pod) error {
	if _, err := netip.ParseAddrPort(r.Remote); err != nil {
		return fmt.Errorf("server saw remote %q: %w", r.Remote, err)
	}
	return demo.CheckDelivered(r, r.Pod, client.Status.PodIP)
}

// accessLogs returns the agents' access-log records (JSON lines on their
// stdout) by node.
func (in *installed) accessLogs(t *testing.T, ctx context.Context) map[string][]map[string]any {
	t.Helper()
	out := map[string][]map[string]any{}
	for node, p := range in.agentPods(t, ctx) {
		logs := kubectl(t, in.c, "", "-n", systemNS, "logs", p.Name, "-c", "agent")
		for _, line := range strings.Split(logs, "\n") {
			var rec map[string]any
			if !strings.HasPrefix(line, "{") || json.Unmarshal([]byte(line), &rec) != nil {
				continue
			}
			if _, ok := rec["src_spiffe_id"]; ok {
				out[node] = append(out[node], rec)
			}
		}
	}
	return out
}

// demoPods are the workloads of proveMesh as the API server had them once
// they were Ready.
type demoPods struct {
	client    *corev1.Pod
	servers   []*corev1.Pod
	clusterIP string // the server Service's
	nodes     map[string]*cluster.Node
}

// traffic makes requests from the client to every server by pod IP (same
// node and across nodes) and to the Service's ClusterIP until every server
// answered once, each through the mesh (meshed).
func (d *demoPods) traffic(t *testing.T, ctx context.Context, c *cluster.Cluster, phase string) {
	t.Helper()
	for _, s := range d.servers {
		r, err := get(ctx, c, demoNS, "client", "http://"+net.JoinHostPort(s.Status.PodIP, "8080")+"/by-pod-ip")
		if err == nil {
			err = meshed(r, d.client)
		}
		if err != nil {
			t.Errorf("%s: client → %s (%s) by pod IP: %v", phase, s.Name, s.Spec.NodeName, err)
		} else {
			t.Logf("%s: client (%s) → %s (%s) by pod IP: through the mesh, source %s", phase, d.client.Spec.NodeName, s.Name, s.Spec.NodeName, r.Remote)
		}
	}
	seen := map[string]bool{}
	for i := 0; i < 4*len(d.servers) && len(seen) < len(d.servers); i++ {
		r, err := get(ctx, c, demoNS, "client", "http://"+net.JoinHostPort(d.clusterIP, "80")+"/by-cluster-ip")
		if err == nil {
			err = meshed(r, d.client)
		}
		if err != nil {
			t.Errorf("%s: client → ClusterIP %s: %v", phase, d.clusterIP, err)
			break
		}
		seen[r.Pod] = true
	}
	t.Logf("%s: client → ClusterIP %s reached %d of %d servers through the mesh", phase, d.clusterIP, len(seen), len(d.servers))
}

// verified waits until every demo pod's capture is verified by its node's
// agent.
func (d *demoPods) verified(t *testing.T, ctx context.Context) {
	t.Helper()
	for _, p := range append([]*corev1.Pod{d.client}, d.servers...) {
		capturedAt(t, ctx, d.nodes[p.Spec.NodeName], demoNS, p.Name)
	}
}

// stillReady checks the client and the servers kept Ready since proveMesh
// saw them first, with no container restart: kubelet's probes got through
// the whole time (they fail after two missed periods of 2 s).
func (d *demoPods) stillReady(t *testing.T, ctx context.Context, c *cluster.Cluster, phase string) {
	t.Helper()
	problems, err := d.readyProblems(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", phase, p)
	}
}

// refreshed returns d with the client and servers read again from the API
// server, for readyProblems to compare against from now on.
func (d *demoPods) refreshed(ctx context.Context, c *cluster.Cluster) (*demoPods, error) {
	out := *d
	out.servers = nil
	for _, s := range append([]*corev1.Pod{d.client}, d.servers...) {
		p, err := c.Server.Client.CoreV1().Pods(demoNS).Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("reading pod %s: %w", s.Name, err)
		}
		if s == d.client {
			out.client = p
		} else {
			out.servers = append(out.servers, p)
		}
	}
	return &out, nil
}

// readyProblems lists the client and servers that are not Ready, turned
// Ready again since proveMesh saw them, or restarted.
func (d *demoPods) readyProblems(ctx context.Context, c *cluster.Cluster) ([]string, error) {
	var out []string
	for _, s := range append([]*corev1.Pod{d.client}, d.servers...) {
		p, err := c.Server.Client.CoreV1().Pods(demoNS).Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("reading pod %s: %w", s.Name, err)
		}
		if at := readyAt(p); at.IsZero() || restarts(p) != restarts(s) || at.After(readyAt(s)) {
			out = append(out, fmt.Sprintf("pod %s: Ready since %v (was %v), %d restarts (was %d)", s.Name, at, readyAt(s), restarts(p), restarts(s)))
		}
	}
	return out, nil
}

// proveMesh runs the mesh proofs on kubelet-made pods: capture verified
// on real containerd sandboxes (--pod-netns=proc), with the time from pod
// Ready; traffic by pod IP (same node and across nodes) and by ClusterIP
// through the agents, with no plaintext on the underlay; a NetworkPolicy
// denying an enrolled and a plaintext client; kubelet probes keeping the
// servers Ready; the SPIFFE IDs in both agents' access logs. It returns
// the workloads for the checks that follow.
func (in *installed) proveMesh(t *testing.T, ctx context.Context) *demoPods {
	c := in.c
	start := time.Now()
	// The demo's workloads (cluster.DemoManifest): three servers, so one
	// shares node1 with the client and another is on node2.
	if err := c.Demo(ctx, testWriter{t}); err != nil {
		t.Fatal(err)
	}
	t.Logf("workloads Ready after %s", time.Since(start).Round(time.Millisecond))

	pods, err := c.Server.Client.CoreV1().Pods(demoNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d := &demoPods{nodes: map[string]*cluster.Node{}}
	for _, n := range c.Nodes {
		d.nodes[n.Name] = n
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		switch p.Labels["app"] {
		case "client":
			d.client = p
		case "server":
			d.servers = append(d.servers, p)
		}
		// --pod-netns=proc: the agent found the pod's containerd sandbox
		// from /proc and proved capture in it.
		at := capturedAt(t, ctx, d.nodes[p.Spec.NodeName], demoNS, p.Name)
		t.Logf("pod %s on %s (%s): Ready → capture verified seen %s later", p.Name, p.Spec.NodeName, p.Status.PodIP, at.Sub(readyAt(p)).Round(time.Millisecond))
	}
	if d.client == nil || len(d.servers) == 0 {
		t.Fatalf("client %v, servers %d", d.client, len(d.servers))
	}
	svc, err := c.Server.Client.CoreV1().Services(demoNS).Get(ctx, "server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d.clusterIP = svc.Spec.ClusterIP
	client, servers := d.client, d.servers

	// Traffic by pod IP and ClusterIP while the underlay bridge between
	// the nodes is captured: nothing of it may cross in plaintext.
	var stopCapture func() []byte
	if len(c.Nodes) > 1 {
		stopCapture = underlayCapture(t, ctx, c)
	}
	d.traffic(t, ctx, c, "mesh")
	if stopCapture != nil {
		pcap := stopCapture()
		crossed := false
		for _, s := range servers {
			if s.Spec.NodeName != client.Spec.NodeName {
				crossed = true
			}
		}
		if !crossed {
			t.Error("no server on another node than the client: nothing crossed the underlay")
		}
		checkNoPlaintext(t, c, pcap, "GET /by-", "X-Nodemesh-Pod", `"podIP"`)
	}

	// STRICT and a NetworkPolicy that admits only the client: the intruder
	// (enrolled, mTLS) and the outsider (not enrolled, plaintext) reach the
	// server before them and are refused after.
	target := "http://" + net.JoinHostPort(servers[0].Status.PodIP, "8080") + "/"
	for _, from := range [][2]string{{demoNS, "intruder"}, {"plain", "outsider"}} {
		if _, err := get(ctx, c, from[0], from[1], target); err != nil {
			t.Errorf("before the NetworkPolicy: %v", err)
		}
	}
	kubectl(t, c, netpol, "apply", "-f", "-")
	for _, from := range [][2]string{{demoNS, "intruder"}, {"plain", "outsider"}} {
		if err := poll(ctx, 30*time.Second, func() (bool, string) {
			_, err := get(ctx, c, from[0], from[1], target)
			return err != nil, from[0] + "/" + from[1] + " still reaches the server past STRICT and the NetworkPolicy"
		}); err != nil {
			t.Error(err)
		}
	}
	d.traffic(t, ctx, c, "STRICT+NetworkPolicy")
	// kubelet's probes (plaintext from the node's cni0 address, through the
	// agents' inbound capture) keep the servers Ready under STRICT and the
	// NetworkPolicy: several probe periods, no restart, no Ready flap.
	time.Sleep(6 * time.Second)
	d.stillReady(t, ctx, c, "STRICT+NetworkPolicy")
	var byPolicy, byStrict float64
	for _, n := range c.Nodes {
		m, err := metrics(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		byPolicy += metricValue(m, "nodemesh_connections_denied_total", `reason="policy"`)
		byStrict += metricValue(m, "nodemesh_connections_denied_total", `reason="strict_mtls"`)
	}
	if byPolicy == 0 || byStrict == 0 {
		t.Errorf("the agents counted %v denials by policy (the intruder) and %v by STRICT (the outsider), want both", byPolicy, byStrict)
	} else {
		t.Logf("the agents counted %v denials by policy and %v by STRICT", byPolicy, byStrict)
	}

	// The SPIFFE IDs of both ends in the access logs of the agents on
	// both ends.
	clientID := "spiffe://cluster.local/ns/demo/sa/client"
	serverID := "spiffe://cluster.local/ns/demo/sa/server"
	logs := in.accessLogs(t, ctx)
	for _, s := range servers {
		for _, reporter := range []struct{ node, dir string }{{client.Spec.NodeName, "source"}, {s.Spec.NodeName, "destination"}} {
			found := false
			for _, rec := range logs[reporter.node] {
				if rec["reporter"] == reporter.dir && rec["src_spiffe_id"] == clientID && rec["dst_spiffe_id"] == serverID &&
					strings.HasPrefix(fmt.Sprint(rec["dst"]), s.Status.PodIP+":") {
					found = true
					break
				}
			}
			if !found {
				t.Errorf("agent on %s: no %s access-log record %s → %s to %s (%d records)", reporter.node, reporter.dir, clientID, serverID, s.Status.PodIP, len(logs[reporter.node]))
			}
		}
	}
	return d
}

// checkNoPlaintext checks a text dump of the underlay (underlayCapture)
// holds HBONE (port 15008) and none of markers, the requests' plaintext.
func checkNoPlaintext(t *testing.T, c *cluster.Cluster, pcap []byte, markers ...string) {
	t.Helper()
	for _, marker := range markers {
		if strings.Contains(string(pcap), marker) {
			t.Errorf("plaintext %q on the underlay bridge %s", marker, c.Bridge())
		}
	}
	if !strings.Contains(string(pcap), ".15008") {
		t.Errorf("no HBONE (port 15008) traffic on the underlay bridge:\n%s", tail(pcap, 2000))
	}
	t.Logf("underlay capture: %d bytes of tcpdump -A, HBONE on 15008, none of the requests' plaintext", len(pcap))
}

// underlayCapture starts tcpdump on the cluster's underlay bridge (every
// packet between nodes crosses it) and returns a function that stops it
// and returns its text dump (-A: payloads as ASCII).
func underlayCapture(t *testing.T, ctx context.Context, c *cluster.Cluster) func() []byte {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "tcpdump", "-i", c.Bridge(), "-n", "-l", "-A", "-s", "0", "tcp")
	cmd.Stdout = &out
	errb := &syncBuffer{}
	cmd.Stderr = errb
	if err := cmd.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	// tcpdump says "listening on" once it captures.
	if err := poll(ctx, 10*time.Second, func() (bool, string) {
		return strings.Contains(errb.String(), "listening on"), "tcpdump not listening: " + errb.String()
	}); err != nil {
		t.Fatal(err)
	}
	return func() []byte {
		time.Sleep(500 * time.Millisecond)
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		return out.Bytes()
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// TestClusterMesh installs nodemesh as a user would on two real nodes:
// the images built without Docker (make image's code) and imported into
// the nodes' containerd, `kubectl apply -k manifests/overlays/cluster`, the
// CA Deployment and the agent DaemonSet Running and Ready through the real
// controllers and kubelets; the agents' containers hold exactly the
// manifest's capabilities. Then it proves the mesh on kubelet-made pods
// (proveMesh) and runs what an operator does to a meshed cluster: a live
// policy explain, a containerd restart, a rolling restart of the agents
// under traffic, new STRICT pods under plaintext from outside the mesh,
// and pod churn. At last the documented uninstall leaves
// nothing on the nodes.
func TestClusterMesh(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	in := upInstalled(t, ctx, 2)
	t.Log(kubectl(t, in.c, "", "get", "pods", "-A", "-o", "wide"))
	in.checkAgentProcesses(t, ctx)
	d := in.proveMesh(t, ctx)
	if !t.Failed() {
		t.Run("PolicyExplain", func(t *testing.T) { in.explainDenial(t, ctx, d) })
		t.Run("ContainerdRestart", func(t *testing.T) { in.restartContainerd(t, ctx, d) })
		t.Run("AgentRollout", func(t *testing.T) { in.rolloutRestart(t, ctx, d) })
		t.Run("NewStrictPod", func(t *testing.T) { in.newStrictPods(t, ctx) })
		t.Run("Churn", func(t *testing.T) { in.churn(t, ctx, d) })
	}
	if t.Failed() {
		// The agents' logs go with the uninstall.
		agentLogs(t, in.c)
	}
	in.uninstall(t, ctx)
}

// syncBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
