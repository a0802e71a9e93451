package cluster_test

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/cluster"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// The operations a user runs on a meshed cluster, each on the cluster
// TestClusterMesh built and meshed (proveMesh): a live policy explain, a
// containerd restart, a rolling restart of the agents under traffic, and
// pod churn.

// explainDenial runs `nodemeshctl policy explain` as a user would, with
// the cluster's kubeconfig: nodemeshctl finds the agent on the source
// pod's node through the API server and asks it, through a port-forward
// (API server → kubelet → containerd), for the decision of the snapshot it
// enforces. The intruder's connection is denied by the NetworkPolicy
// proveMesh applied; the client's is allowed.
func (in *installed) explainDenial(t *testing.T, ctx context.Context, d *demoPods) {
	ctl := labtest.GoBuild(t, "./cmd/nodemeshctl")
	server := demoNS + "/" + d.servers[0].Name
	explain := func(src string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		args := []string{"--kubeconfig", in.c.Kubeconfig(), "policy", "explain", "--src", src, "--dst", server, "--port", "8080"}
		out, err := exec.CommandContext(ctx, ctl, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("nodemeshctl %s: %v\n%s", strings.Join(args[2:], " "), err, out)
		}
		t.Logf("nodemeshctl %s:\n%s", strings.Join(args[2:], " "), out)
		return string(out)
	}
	out := explain(demoNS + "/intruder")
	for _, want := range []string{
		"DENY  " + demoNS + "/intruder (", "-> " + server + " (",
		"mTLS as spiffe://cluster.local/ns/demo/sa/intruder",
		"decided by: ingress, NetworkPolicy demo/server-from-client",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("policy explain of the intruder's denial: no %q", want)
		}
	}
	out = explain(demoNS + "/client")
	if !strings.Contains(out, "ALLOW  "+demoNS+"/client (") {
		t.Errorf("policy explain of the client: not allowed")
	}
}

// captureWatch polls the agents' metrics until stopped and notes every
// time one of the pods was seen with its capture not verified. An agent
// that does not answer (restarting) is skipped, not counted.
type captureWatch struct {
	stop    chan struct{}
	done    chan struct{}
	samples int
	lapses  []string
}

func watchCapture(ctx context.Context, nodes map[string]*cluster.Node, pods []*corev1.Pod) *captureWatch {
	w := &captureWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			for _, n := range nodes {
				m, err := metrics(ctx, n)
				if err != nil {
					continue
				}
				w.samples++
				for _, p := range pods {
					if p.Spec.NodeName != n.Name {
						continue
					}
					if metricValue(m, "nodemesh_capture_status", `namespace="`+p.Namespace+`"`, `pod="`+p.Name+`"`, `status="verified"`) != 1 {
						w.lapses = append(w.lapses, time.Now().Format("15:04:05.000")+" "+p.Namespace+"/"+p.Name)
					}
				}
			}
			select {
			case <-w.stop:
				return
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return w
}

// end stops the watch and fails t if a pod's capture was not verified at
// some sample.
func (w *captureWatch) end(t *testing.T, what string) {
	t.Helper()
	close(w.stop)
	<-w.done
	if len(w.lapses) > 0 {
		t.Errorf("%s: capture not verified at %d of %d samples: %v", what, len(w.lapses), w.samples, w.lapses[:min(len(w.lapses), 10)])
	} else {
		t.Logf("%s: every meshed pod's capture verified at all %d samples of the agents' metrics", what, w.samples)
	}
}

// restartContainerd restarts containerd on the client's node, as a
// service manager (or an upgrade) would. The pods' shims outlive it: the
// pods stay Ready with no restart, the agent (which finds sandboxes from
// /proc, not through containerd) keeps their capture verified throughout,
// and traffic works after.
func (in *installed) restartContainerd(t *testing.T, ctx context.Context, d *demoPods) {
	n := d.nodes[d.client.Spec.NodeName]
	agentBefore := in.agentPods(t, ctx)[n.Name]
	w := watchCapture(ctx, map[string]*cluster.Node{n.Name: n}, append([]*corev1.Pod{d.client}, d.servers...))
	start := time.Now()
	if err := in.c.RestartContainerd(ctx, n); err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd on %s restarted and answering after %s", n.Name, time.Since(start).Round(time.Millisecond))
	// kubectl exec goes through the new containerd (CRI exec).
	d.traffic(t, ctx, in.c, "after the containerd restart")
	// Two probe periods of the servers (2 s) after the restart, so a probe
	// kubelet failed would show as a Ready flap.
	if left := 5*time.Second - time.Since(start); left > 0 {
		time.Sleep(left)
	}
	w.end(t, "containerd restart on "+n.Name)
	d.stillReady(t, ctx, in.c, "containerd restart")
	agent := in.agentPods(t, ctx)[n.Name]
	if agent.UID != agentBefore.UID || restarts(&agent) != restarts(&agentBefore) {
		t.Errorf("the agent on %s was replaced or restarted by the containerd restart", n.Name)
	}
}

// connStats counts a traffic run's connections by outcome.
type connStats struct {
	mu        sync.Mutex
	completed int // answered by the server, through the mesh
	reset     int // refused, reset or closed before the answer: fail closed
	resets    map[string]int
	leaked    []string // answered around the mesh, or still open past the deadline
	odd       []string // answered with something the server never sends
	// lastCompleted is when the last connection completed.
	lastCompleted time.Time
}

// connDeadline is how long a connection of the traffic generator may stay
// open. It is above the agents' drain deadline (30 s, then they cut what
// is left), so a connection still open at the deadline was leaked, not
// drained.
const connDeadline = 45 * time.Second

// trafficGen opens connections from inside the client pod's network
// namespace (so capture takes them, as it takes the application's) to
// each target in turn, with workers connections at a time, until stopped;
// each sends one request whose answer the server delays, so connections
// are in flight whenever an agent goes away.
type trafficGen struct {
	stats connStats
	stop  chan struct{}
	wg    sync.WaitGroup
}

func startTraffic(ctx context.Context, netnsPath string, client *corev1.Pod, targets []string, workers int) *trafficGen {
	g := &trafficGen{stop: make(chan struct{}), stats: connStats{resets: map[string]int{}}}
	d := &inpod.Dialer{Netns: netnsPath}
	for w := range workers {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-g.stop:
					return
				case <-ctx.Done():
					return
				default:
				}
				target := targets[(i*workers+w)%len(targets)]
				g.stats.add(oneConn(ctx, d, target, client, fmt.Sprintf("/rollout-%d-%d", w, i)))
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	return g
}

// end stops the generator once every connection in flight ended.
func (g *trafficGen) end() *connStats {
	close(g.stop)
	g.wg.Wait()
	return &g.stats
}

// snapshot returns how many connections completed so far, and when the
// last one did.
func (s *connStats) snapshot() (completed int, last time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.completed, s.lastCompleted
}

type outcome struct {
	kind   string // "completed", "reset", "leaked", "odd"
	detail string
}

func (s *connStats) add(o outcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch o.kind {
	case "completed":
		s.completed++
		s.lastCompleted = time.Now()
	case "reset":
		s.reset++
		s.resets[o.detail]++
	case "leaked":
		s.leaked = append(s.leaked, o.detail)
	default:
		s.odd = append(s.odd, o.detail)
	}
}

// oneConn makes one connection with one request and says how it ended.
func oneConn(ctx context.Context, d *inpod.Dialer, target string, client *corev1.Pod, path string) outcome {
	ctx, cancel := context.WithTimeout(ctx, connDeadline)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return failed("connect to "+target, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(connDeadline))
	req := "GET " + path + " HTTP/1.1\r\nHost: " + target + "\r\n" + workload.HeaderDelay + ": 300ms\r\nConnection: close\r\n\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		return failed("send to "+target, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return failed("answer from "+target, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return failed("answer from "+target, err)
	}
	var r workload.Reply
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &r) != nil {
		return outcome{"odd", fmt.Sprintf("%s: %s %q", target, resp.Status, body)}
	}
	if err := meshed(r, client); err != nil {
		return outcome{"leaked", target + " answered around the mesh: " + err.Error()}
	}
	return outcome{kind: "completed"}
}

// failed classifies a connection's error: past the deadline it was
// leaked (nothing ended it); anything else ended it from the other side
// (refused, reset, closed), which is failing closed.
func failed(what string, err error) outcome {
	var kind string
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return outcome{"leaked", what + ": still open after " + connDeadline.String()}
	case errors.Is(err, syscall.ECONNREFUSED):
		kind = "refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		kind = "reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		kind = "closed"
	default:
		kind = "other: " + err.Error()
	}
	return outcome{"reset", strings.Fields(what)[0] + " " + kind}
}

// podNetns returns the network namespace of pod, from one of its
// processes named comm (as the agent's --pod-netns=proc finds it).
func podNetns(t *testing.T, p *corev1.Pod, comm string) string {
	t.Helper()
	pids := procsOfPod(t, string(p.UID), comm)
	if len(pids) == 0 {
		t.Fatalf("no %s process of pod %s/%s", comm, p.Namespace, p.Name)
	}
	return "/proc/" + strconv.Itoa(pids[0]) + "/ns/net"
}

// rolloutRestart restarts the agent DaemonSet with kubectl, one node at a
// time as its update strategy says, while the client opens connections to
// every server (both nodes) and to the ClusterIP, and the underlay is
// captured. Every connection must complete through the mesh or be
// refused or reset; none may be answered around the mesh or hang, and
// nothing crosses the underlay in plaintext. After the rollout the new
// agents verify every pod's capture again, traffic completes, and their
// connection counters show nothing left open.
func (in *installed) rolloutRestart(t *testing.T, ctx context.Context, d *demoPods) {
	c := in.c
	before := in.agentPods(t, ctx)
	var targets []string
	for _, s := range d.servers {
		targets = append(targets, net.JoinHostPort(s.Status.PodIP, "8080"))
	}
	targets = append(targets, net.JoinHostPort(d.clusterIP, "80"))
	// The pods as they are now: kubelet's probes must keep them Ready,
	// with no restart, through the rollout.
	base, err := d.refreshed(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	stopCapture := underlayCapture(t, ctx, c)
	g := startTraffic(ctx, podNetns(t, d.client, "nodemeshctl"), d.client, targets, 3)
	if err := poll(ctx, time.Minute, func() (bool, string) {
		n, _ := g.stats.snapshot()
		return n >= 10, "traffic not flowing before the rollout: " + strconv.Itoa(n) + " connections completed"
	}); err != nil {
		g.end()
		stopCapture()
		t.Fatal(err)
	}
	start := time.Now()
	kubectl(t, c, "", "-n", systemNS, "rollout", "restart", "daemonset/nodemesh-agent")
	kubectl(t, c, "", "-n", systemNS, "rollout", "status", "daemonset/nodemesh-agent", "--timeout=5m")
	rolled := time.Since(start)
	after := in.agentPods(t, ctx)
	for node, p := range after {
		if before[node].UID == p.UID {
			t.Errorf("the agent on %s was not replaced by the rollout", node)
		}
	}
	// The new agents adopt the pinned capture and verify it again; then
	// connections complete again.
	d.verified(t, ctx)
	back := time.Now()
	if err := poll(ctx, time.Minute, func() (bool, string) {
		_, last := g.stats.snapshot()
		return last.After(back), "no connection completed since the new agents verified capture"
	}); err != nil {
		t.Error(err)
	}
	st := g.end()
	pcap := stopCapture()
	t.Logf("kubectl rollout restart daemonset/nodemesh-agent: rolled out in %s; %d connections: %d completed through the mesh, %d refused or reset %v, %d leaked, %d odd",
		rolled.Round(time.Millisecond), st.completed+st.reset+len(st.leaked)+len(st.odd), st.completed, st.reset, st.resets, len(st.leaked), len(st.odd))
	if len(st.leaked) > 0 || len(st.odd) > 0 {
		t.Errorf("connections leaked: %q; odd answers: %q", st.leaked[:min(len(st.leaked), 10)], st.odd[:min(len(st.odd), 10)])
	}
	checkNoPlaintext(t, c, pcap, "GET /rollout-", workload.HeaderDelay, `"podIP"`)
	// The new agents close every connection they opened: their opened and
	// closed counters meet once the traffic stopped (kubelet's probes pass
	// through them too, so poll for a moment between probes).
	for _, n := range c.Nodes {
		var last string
		if err := poll(ctx, time.Minute, func() (bool, string) {
			m, err := metrics(ctx, n)
			if err != nil {
				return false, err.Error()
			}
			opened, closed := metricValue(m, "istio_tcp_connections_opened_total"), metricValue(m, "istio_tcp_connections_closed_total")
			streams := metricValue(m, "nodemesh_tunnel_server_streams")
			// The node's connections that reached a pod's probe port while
			// no agent listened (a pinned counter: it outlives the agents).
			passed := metricValue(m, "nodemesh_capture_events_total", `event="lookup_node_passed"`)
			last = fmt.Sprintf("%v opened, %v closed, %v tunnel streams open; %v probe connections from the node passed while no agent listened", opened, closed, streams, passed)
			return opened == closed && streams == 0, "the agent on " + n.Name + " still holds connections: " + last
		}); err != nil {
			t.Error(err)
		} else {
			t.Logf("new agent on %s: %s", n.Name, last)
		}
	}
	// kubelet's probes of the servers reach them while their node's agent
	// restarts (capture opens their probe ports to the node while no agent
	// listens, docs/security.md): no server turned unready or restarted.
	// A probe failing at the end of the rollout shows within two periods
	// (2 s each) of the servers' probes; the checks above took at least
	// that long, but wait for it anyway.
	time.Sleep(5 * time.Second)
	problems, err := base.readyProblems(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("kubelet's probes failed during the agent rollout: %s", p)
	}
	t.Logf("pods after the rollout: %d of %d not Ready throughout or restarted %q", len(problems), 1+len(base.servers), problems)
}

// restarts sums the restarts of p's containers.
func restarts(p *corev1.Pod) int32 {
	var n int32
	for _, s := range p.Status.ContainerStatuses {
		n += s.RestartCount
	}
	return n
}

// capturePodRE takes the pod of a nodemesh_capture_status sample.
var capturePodRE = regexp.MustCompile(`^nodemesh_capture_status\{.*\bpod="([^"]+)".*\bstatus="([a-z]+)".*\} 1$`)

// capturedPods returns the pods of namespace ns (name prefix prefix) that
// an agent's metrics text lists, with whether capture is verified.
func capturedPods(text, ns, prefix string) map[string]bool {
	out := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "nodemesh_capture_status{") || !strings.Contains(line, `namespace="`+ns+`"`) {
			continue
		}
		m := capturePodRE.FindStringSubmatch(line)
		if m == nil || !strings.HasPrefix(m[1], prefix) {
			continue
		}
		out[m[1]] = out[m[1]] || m[2] == "verified"
	}
	return out
}

// churnPods is how many pods churn creates, and churnEvery how often.
const (
	churnPods  = 100
	churnEvery = 300 * time.Millisecond
)

// churn creates churnPods enrolled pods, one every churnEvery (100 in
// 30 s), and deletes each as soon as its node's agent reports its capture
// verified, while the agents keep the meshed pods' capture verified. It
// measures the time from each pod turning Ready (seen by a watch) to its
// capture verified (seen in the agent's metrics, polled every 250 ms), and
// checks the agents forget every churned pod.
func (in *installed) churn(t *testing.T, ctx context.Context, d *demoPods) {
	c := in.c
	client := c.Server.Client
	w := watchCapture(ctx, d.nodes, append([]*corev1.Pod{d.client}, d.servers...))

	var mu sync.Mutex
	ready := map[string]time.Time{}
	verified := map[string]time.Time{}
	node := map[string]string{}
	deleted := map[string]bool{}
	ictx, cancel := context.WithCancel(ctx)
	f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(demoNS),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = "app=churn" }))
	defer func() {
		cancel()
		f.Shutdown()
	}()
	inf := f.Core().V1().Pods().Informer()
	seen := func(obj any) {
		p, ok := obj.(*corev1.Pod)
		if !ok || readyAt(p).IsZero() {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if _, ok := ready[p.Name]; !ok {
			ready[p.Name] = time.Now()
			node[p.Name] = p.Spec.NodeName
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: seen, UpdateFunc: func(_, o any) { seen(o) }}); err != nil {
		t.Fatal(err)
	}
	f.Start(ictx.Done())
	if !cache.WaitForCacheSync(ictx.Done(), inf.HasSynced) {
		t.Fatal("pod informer did not sync")
	}

	// The metrics poller: the first time each churned pod shows verified,
	// and deleting it then.
	var pollerWG sync.WaitGroup
	pollerWG.Add(1)
	go func() {
		defer pollerWG.Done()
		for ictx.Err() == nil {
			for _, n := range c.Nodes {
				m, err := metrics(ictx, n)
				if err != nil {
					continue
				}
				now := time.Now()
				var del []string
				mu.Lock()
				for pod, ok := range capturedPods(m, demoNS, "churn-") {
					if _, done := verified[pod]; ok && !done {
						verified[pod] = now
					}
				}
				// Deleted once both are seen, so every pod is measured.
				for pod := range verified {
					if _, ok := ready[pod]; ok && !deleted[pod] {
						del = append(del, pod)
					}
				}
				mu.Unlock()
				for _, pod := range del {
					if err := client.CoreV1().Pods(demoNS).Delete(ictx, pod, metav1.DeleteOptions{}); err == nil || apierrors.IsNotFound(err) {
						mu.Lock()
						deleted[pod] = true
						mu.Unlock()
					}
				}
			}
			select {
			case <-ictx.Done():
			case <-time.After(250 * time.Millisecond):
			}
		}
	}()

	start := time.Now()
	for i := range churnPods {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("churn-%03d", i), Namespace: demoNS, Labels: map[string]string{"app": "churn"}},
			Spec: corev1.PodSpec{
				// Nothing to mount or inject: the pods never call the API.
				AutomountServiceAccountToken:  ptr.To(false),
				EnableServiceLinks:            ptr.To(false),
				TerminationGracePeriodSeconds: ptr.To[int64](1),
				Containers: []corev1.Container{{
					Name: "sleep", Image: "localhost/nodemesh-workload:dev", ImagePullPolicy: corev1.PullNever, Args: []string{"sleep"},
				}},
			},
		}
		if _, err := client.CoreV1().Pods(demoNS).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating %s: %v", p.Name, err)
		}
		time.Sleep(churnEvery)
	}
	created := time.Since(start)
	// Every pod verified (and so deleted); a pod whose capture the agent
	// never verifies fails here.
	if err := poll(ctx, 5*time.Minute, func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		var missing []string
		for i := range churnPods {
			if name := fmt.Sprintf("churn-%03d", i); !deleted[name] {
				missing = append(missing, name)
			}
		}
		return len(missing) == 0, fmt.Sprintf("%d pods not verified and deleted (Ready: %d, verified: %d): %v", len(missing), len(ready), len(verified), missing[:min(len(missing), 10)])
	}); err != nil {
		t.Error(err)
	}
	cancel()
	pollerWG.Wait()
	// Gone from the API (kubelet stopped them), then from both agents.
	if err := poll(ctx, 5*time.Minute, func() (bool, string) {
		l, err := client.CoreV1().Pods(demoNS).List(ctx, metav1.ListOptions{LabelSelector: "app=churn"})
		if err != nil {
			return false, err.Error()
		}
		return len(l.Items) == 0, fmt.Sprintf("%d churned pods still exist", len(l.Items))
	}); err != nil {
		t.Error(err)
	}
	churned := time.Since(start)
	if err := poll(ctx, time.Minute, func() (bool, string) {
		var left []string
		for _, n := range c.Nodes {
			m, err := metrics(ctx, n)
			if err != nil {
				return false, err.Error()
			}
			for pod := range capturedPods(m, demoNS, "churn-") {
				left = append(left, n.Name+":"+pod)
			}
		}
		return len(left) == 0, fmt.Sprintf("agents still list the capture of deleted pods: %v", left)
	}); err != nil {
		t.Error(err)
	}
	w.end(t, "churn")

	mu.Lock()
	defer mu.Unlock()
	type sample struct {
		pod string
		dt  time.Duration
	}
	var samples []sample
	early := 0
	perNode := map[string]int{}
	for pod, r := range ready {
		v, ok := verified[pod]
		if !ok {
			continue
		}
		perNode[node[pod]]++
		dt := v.Sub(r)
		if dt < 0 {
			early++ // verified before kubelet reported the pod Ready
			dt = 0
		}
		samples = append(samples, sample{pod, dt})
	}
	slices.SortFunc(samples, func(a, b sample) int { return cmp.Compare(a.dt, b.dt) })
	var lat []time.Duration
	for _, s := range samples {
		lat = append(lat, s.dt)
	}
	if len(lat) == 0 {
		t.Fatal("no churned pod was both seen Ready and verified")
	}
	pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	t.Logf("churn: %d pods created in %s (one every %s), each deleted once verified; all gone from the API after %s; per node %v",
		churnPods, created.Round(time.Millisecond), churnEvery, churned.Round(time.Millisecond), perNode)
	t.Logf("churn: pod Ready → capture verified over %d pods: p50 %s, p99 %s, max %s (%d verified before Ready counted as 0; metrics polled every 250 ms)",
		len(lat), pct(0.50).Round(time.Millisecond), pct(0.99).Round(time.Millisecond), lat[len(lat)-1].Round(time.Millisecond), early)
	for _, s := range samples[max(0, len(samples)-3):] {
		t.Logf("churn: slow: %s on %s Ready %s after the first create, verified %s later",
			s.pod, node[s.pod], ready[s.pod].Sub(start).Round(time.Millisecond), s.dt.Round(time.Millisecond))
	}
	for _, p := range in.agentPods(t, ctx) {
		if n := restarts(&p); n != 0 {
			t.Errorf("agent %s restarted %d times during the churn", p.Name, n)
		}
	}
}
