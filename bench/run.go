package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/bench/load"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/spec"
)

// Scenario names.
const (
	scenarioLoopback  = "loopback"
	scenarioNoMesh    = "a-nomesh"
	scenarioNoMeshLoc = "a-nomesh-same-node"
	scenarioMeshCross = "b-nodemesh-l4"
	scenarioMeshLocal = "b-nodemesh-l4-same-node"
	scenarioSkMsgOn   = "c-skmsg-on"
	scenarioSkMsgOff  = "c-skmsg-off"
	scenarioHAProxy   = "d-haproxy-sidecar"
	scenarioMeshSide  = "d-nodemesh-sidecar"
	scenarioL7        = "e-nodemesh-l7"
	scenarioHAProxyL7 = "e-haproxy-http-sidecar"
)

// Workload names.
const (
	workloadRR   = "tcp-rr"
	workloadCRR  = "tcp-crr"
	workloadBulk = "bulk"
)

func httpWorkload(rate float64, conns int) string {
	return fmt.Sprintf("http-%grps-%dc", rate, conns)
}

// Lab layout.
const (
	benchNS     = "bench"
	node1       = "node-1"
	node2       = "node-2"
	trustDomain = "cluster.local"
)

// meshUnavailable is why the nodemesh scenarios cannot run yet. The agent
// binary exists, but nothing starts it in the lab (a CA, its token, the
// trust bundle ConfigMap and the agent per node); the benchmark reports
// these scenarios as not available rather than guessing numbers.
const meshUnavailable = "nodemesh did not start in the lab (see results.json for why); no numbers were measured"

// Reasons for the scenarios nodemesh cannot offer yet.
const (
	noAccelSwitch = "the agent has no switch to force sk_msg acceleration; its automatic probe decides"
)

// scenarios lists every scenario of issue 8 in the order of the report.
func scenarios() []Scenario {
	return []Scenario{
		{Name: scenarioLoopback, Title: "machine limit: loopback inside one pod, no proxy"},
		{Name: scenarioNoMesh, Title: "(a) no mesh, pod to pod across nodes"},
		{Name: scenarioNoMeshLoc, Title: "(a) no mesh, pod to pod on one node"},
		{Name: scenarioMeshCross, Title: "(b) nodemesh L4 across nodes", Baseline: scenarioNoMesh, NotAvailable: meshUnavailable},
		{Name: scenarioMeshLocal, Title: "(b) nodemesh L4 on one node", Baseline: scenarioNoMeshLoc, NotAvailable: meshUnavailable},
		{Name: scenarioSkMsgOn, Title: "(c) nodemesh on one node, sk_msg on", Baseline: scenarioNoMeshLoc, NotAvailable: meshUnavailable},
		{Name: scenarioSkMsgOff, Title: "(c) nodemesh on one node, sk_msg off", Baseline: scenarioNoMeshLoc, NotAvailable: meshUnavailable},
		{Name: scenarioHAProxy, Title: "(d) HAProxy mTLS sidecars across nodes", Baseline: scenarioNoMesh},
		{Name: scenarioMeshSide, Title: "(d) nodemesh proxy as per-pod sidecars across nodes (one agent per pod, --only-pod)", Baseline: scenarioNoMesh, NotAvailable: meshUnavailable},
		{Name: scenarioL7, Title: "(e) nodemesh L7 across nodes: a Service opted in to L7, each request parsed and routed by the client's agent and authorised by the server's", Baseline: scenarioNoMesh, NotAvailable: meshUnavailable},
		{Name: scenarioHAProxyL7, Title: "(e) HAProxy HTTP-mode mTLS sidecars across nodes: the L7 sidecar baseline", Baseline: scenarioNoMesh},
	}
}

// Pods of the bench lab.
const (
	podClient   = benchNS + "/client"
	podServer   = benchNS + "/server"
	podServerL  = benchNS + "/server-local"
	podSCClient = benchNS + "/sc-client"
	podSCServer = benchNS + "/sc-server"

	podMeshClient  = meshNS + "/mesh-client"
	podMeshServer  = meshNS + "/mesh-server"
	podMeshServerL = meshNS + "/mesh-server-local"

	// The L7 scenario's server and the Service that opts it in. It has a
	// pod of its own, so that no pod of the L4 scenarios backs an
	// opted-in Service: their ports are never claimed for L7 and their
	// figures are those of the L4 path (TestL4PodsNotOptedIn).
	podMeshServerL7 = meshNS + "/mesh-server-l7"
	svcMeshL7       = meshNS + "/mesh-l7"
	svcMeshL7Port   = 80
)

// Spec returns the lab the benchmark runs on: four nodes; a client on
// node-1 with servers on node-2 (across nodes) and node-1 (same node);
// a client and sidecarServers servers for each sidecar scenario (HAProxy
// on node-1/node-2, per-pod nodemesh agents on node-3/node-4). worker is
// the path of the WorkerName symlink that runs the benchmark server.
func Spec(worker string, sidecarServers int) (*spec.Spec, error) {
	sidecarServers = max(sidecarServers, 1)
	server := func(name, node, sa string) spec.Pod {
		return spec.Pod{
			Name: name, Namespace: benchNS, Node: node, ServiceAccount: sa,
			Labels:  map[string]string{"app": "bench-server"},
			Command: []string{worker, "serve"},
			Ports: []spec.ContainerPort{
				{Name: "http", ContainerPort: load.DefaultHTTPPort},
				{Name: "echo", ContainerPort: load.DefaultEchoPort},
				{Name: "sink", ContainerPort: load.DefaultSinkPort},
			},
		}
	}
	client := func(name, node string) spec.Pod {
		return spec.Pod{
			Name: name, Namespace: benchNS, Node: node, ServiceAccount: "bench-client",
			Labels:  map[string]string{"app": "bench-client"},
			Command: []string{"nodemeshctl", "lab", "workload", "sleep"},
		}
	}
	sp := &spec.Spec{
		APIVersion: spec.APIVersion, Kind: spec.Kind,
		Nodes:      []spec.Node{{Name: node1}, {Name: node2}, {Name: node3}, {Name: node4}},
		Namespaces: []spec.Namespace{{Name: benchNS}},
		Pods: []spec.Pod{
			client("client", node1),
			server("server", node2, "bench-server"),
			server("server-local", node1, "bench-server"),
			client("sc-client", node1),
			server("sc-server", node2, "bench-server"),
		},
	}
	for i := 2; i <= sidecarServers; i++ {
		sp.Pods = append(sp.Pods, server(fmt.Sprintf("sc-server-%d", i), node2, "bench-server"))
	}
	// The same client and servers once more in a namespace enrolled in
	// nodemesh (inert while no agent runs).
	sp.Namespaces = append(sp.Namespaces, spec.Namespace{Name: meshNS, Labels: map[string]string{state.LabelMode: state.ModeEnabled}})
	inMesh := func(p spec.Pod) spec.Pod {
		p.Namespace = meshNS
		return p
	}
	sp.Pods = append(sp.Pods,
		inMesh(client("mesh-client", node1)),
		inMesh(server("mesh-server", node2, "bench-server")),
		inMesh(server("mesh-server-local", node1, "bench-server")),
	)
	for i := 2; i <= sidecarServers; i++ {
		sp.Pods = append(sp.Pods, inMesh(server(fmt.Sprintf("mesh-server-%d", i), node2, "bench-server")))
	}
	// Scenario (e): an L7 server on node-2 behind a Service labelled for
	// L7 (undeclared appProtocol: the agents detect HTTP/1.1).
	l7Server := inMesh(server("mesh-server-l7", node2, "bench-server"))
	l7Server.Labels = map[string]string{"app": "bench-server-l7"}
	sp.Pods = append(sp.Pods, l7Server)
	_, l7Name, _ := strings.Cut(svcMeshL7, "/")
	sp.Services = append(sp.Services, spec.Service{
		Name: l7Name, Namespace: meshNS, Labels: map[string]string{l7.LabelL7: l7.ValueEnabled},
		Selector: map[string]string{"app": "bench-server-l7"},
		Ports:    []spec.ServicePort{{Name: "http", Port: svcMeshL7Port, TargetPort: intstr.FromInt32(load.DefaultHTTPPort)}},
	})
	// nodemesh in per-pod sidecar mode, on nodes of its own (podmesh.go).
	sp.Pods = append(sp.Pods,
		inMesh(client("ps-client", node3)),
		inMesh(server("ps-server", node4, "bench-server")),
	)
	for i := 2; i <= sidecarServers; i++ {
		sp.Pods = append(sp.Pods, inMesh(server(fmt.Sprintf("ps-server-%d", i), node4, "bench-server")))
	}
	sp.Default()
	if err := sp.Validate("bench"); err != nil {
		return nil, fmt.Errorf("bench lab spec: %w", err)
	}
	return sp, nil
}

// meshPods returns the mesh scenario's pods for n server pods per node.
func meshPods(n int) []string {
	out := []string{podMeshClient, podMeshServerL, podMeshServerL7}
	return append(out, meshServerPods(n)...)
}

// meshServerPods returns the mesh scenario's server pods on node-2.
func meshServerPods(n int) []string {
	out := []string{podMeshServer}
	for i := 2; i <= n; i++ {
		out = append(out, fmt.Sprintf("%s/mesh-server-%d", meshNS, i))
	}
	return out
}

// sidecarServerPods returns the sidecar scenario's server pod keys for n
// pods per node.
func sidecarServerPods(n int) []string {
	out := []string{podSCServer}
	for i := 2; i <= n; i++ {
		out = append(out, fmt.Sprintf("%s/sc-server-%d", benchNS, i))
	}
	return out
}

// Options configure Run.
type Options struct {
	Profile Profile
	// Lab to run on. Nil: Run brings one up in StateDir (with ID) and takes
	// it down at the end.
	Lab      *lab.Lab
	StateDir string
	ID       string
	// WorkDir holds the worker symlink, certificates and proxy configs;
	// "" = a fresh temporary directory, removed at the end.
	WorkDir string
	// AgentBinary and CABinary are cmd/nodemesh-agent and cmd/nodemesh-ca;
	// without them the nodemesh scenarios report why they did not run.
	AgentBinary string
	CABinary    string
	// Scenarios, when set, runs only these scenarios (names or letters a
	// to e, SelectScenarios) and their baselines; the others are reported
	// as not selected, and nothing is started for them.
	Scenarios []string
	// ProfileDir, when set, receives CPU profiles of the agents taken
	// during the first round of the nodemesh runs of the headline HTTP
	// workload (L4 and L7: agent-NODE-l7-WORKLOAD.pprof) and of bulk
	// (pprof format; `go tool pprof -top FILE`), and
	// Go execution traces during the one-connection HTTP workload, whose
	// tail latency is the agent's scheduling (`go tool trace FILE`).
	ProfileDir string
	Log        *slog.Logger
}

// runner holds one benchmark run's state.
type runner struct {
	o       Options
	log     *slog.Logger
	lab     *lab.Lab
	work    string
	worker  string
	haproxy string
	ca      *sidecarCA
	// sidecars: pod key -> haproxy pid.
	sidecars map[string]int
	serial   int64
	mesh     *mesh
	// sel is the scenarios to run; nil: all.
	sel map[string]bool
}

// Run runs the benchmark and returns its results. A scenario that cannot
// run is reported with the reason; Run fails only when nothing useful can
// be measured (no lab, no baseline).
func Run(ctx context.Context, o Options) (res *Results, err error) {
	if o.Profile.Rounds < 1 || o.Profile.Duration <= 0 || len(o.Profile.HTTPConns) == 0 || !(o.Profile.HTTPRate > 0) {
		return nil, fmt.Errorf("profile %q: needs rounds >= 1, a positive duration and rate, and HTTP connection counts", o.Profile.Name)
	}
	r := &runner{o: o, log: o.Log, sidecars: map[string]int{}}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if len(o.Scenarios) > 0 {
		if r.sel, err = SelectScenarios(o.Scenarios); err != nil {
			return nil, err
		}
	}
	res = &Results{Profile: o.Profile, Started: time.Now().UTC(), Scenario: scenarios()}
	res.Method = methodNotes()
	for i := range res.Scenario {
		if !r.selected(res.Scenario[i].Name) {
			res.Scenario[i].NotAvailable = notSelected
		}
	}

	r.work = o.WorkDir
	if r.work == "" {
		d, err := os.MkdirTemp("", "nmbench-")
		if err != nil {
			return nil, fmt.Errorf("creating a work directory: %w", err)
		}
		r.work = d
		defer os.RemoveAll(d)
	}
	if r.worker, err = LinkWorker(r.work); err != nil {
		return nil, err
	}
	r.lab = o.Lab
	if r.lab == nil {
		sp, err := Spec(r.worker, 1)
		if err != nil {
			return nil, err
		}
		r.log.Info("bringing up the bench lab", "dir", o.StateDir)
		l, err := lab.Up(ctx, sp, lab.Options{StateDir: o.StateDir, ID: o.ID, Log: r.log})
		if err != nil {
			return nil, fmt.Errorf("bringing up the bench lab: %w", err)
		}
		r.lab = l
		defer func() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
			defer cancel()
			if derr := l.Down(dctx); derr != nil {
				err = errors.Join(err, fmt.Errorf("taking the bench lab down: %w", derr))
			}
		}()
	}
	defer r.stopSidecars()
	if err := r.tunePods(); err != nil {
		return nil, err
	}

	res.Machine = machineLimits()
	foreign := newForeignMeter(r.lab.CgroupRoot(), res.Machine.CPUs)
	if _, err := foreign.sample(); err != nil {
		r.log.Warn("cannot measure other processes' CPU during runs; judging the machine by its load averages", "err", err)
		foreign = nil
	}
	res.Machine.ForeignMeasured = foreign != nil

	// The sidecar baselines: certificates and HAProxy in client and
	// server, with TCP-mode (d) and HTTP-mode (e) listeners.
	sidecarErr := errors.New(notSelected)
	if r.selected(scenarioHAProxy, scenarioHAProxyL7) {
		sidecarErr = r.setupSidecars(ctx)
	}
	if sidecarErr != nil {
		r.log.Warn("HAProxy sidecar scenarios not available", "err", sidecarErr)
		for i := range res.Scenario {
			if n := res.Scenario[i].Name; (n == scenarioHAProxy || n == scenarioHAProxyL7) && r.selected(n) {
				res.Scenario[i].NotAvailable = sidecarErr.Error()
			}
		}
	}

	// nodemesh: the CA and an agent per node.
	var m *mesh
	meshErr := errors.New(notSelected)
	if r.selected(scenarioMeshCross, scenarioMeshLocal, scenarioSkMsgOn, scenarioSkMsgOff, scenarioMeshSide, scenarioL7) {
		m, meshErr = r.startMesh(ctx)
	}
	r.mesh = m
	defer r.stopMesh(m)
	if meshErr != nil {
		r.log.Warn("nodemesh scenarios not available", "err", meshErr)
	}
	// nodemesh in per-pod sidecar mode: one agent per pod.
	podErr := meshErr
	if meshErr == nil {
		podErr = errors.New(notSelected)
		if r.selected(scenarioMeshSide) {
			podErr = r.startPodSidecars(ctx, m)
		}
		if podErr != nil {
			r.log.Warn("nodemesh sidecar scenario not available", "err", podErr)
		}
	}
	for i := range res.Scenario {
		sc := &res.Scenario[i]
		if !r.selected(sc.Name) {
			continue
		}
		switch sc.Name {
		case scenarioMeshCross, scenarioMeshLocal, scenarioL7:
			sc.NotAvailable = ""
			if meshErr != nil {
				sc.NotAvailable = "nodemesh did not start: " + meshErr.Error()
			}
		case scenarioMeshSide:
			sc.NotAvailable = ""
			switch {
			case meshErr != nil:
				sc.NotAvailable = "nodemesh did not start: " + meshErr.Error()
			case podErr != nil:
				sc.NotAvailable = "the per-pod agents did not start: " + podErr.Error()
			}
		case scenarioSkMsgOn, scenarioSkMsgOff:
			switch {
			case meshErr != nil:
				sc.NotAvailable = "nodemesh did not start: " + meshErr.Error()
			case m.accel == (sc.Name == scenarioSkMsgOn):
				sc.NotAvailable = fmt.Sprintf("measured as %s: the agent runs with sk_msg acceleration %s here (%s)", scenarioMeshLocal, onOff(m.accel), m.accelReason)
			default:
				sc.NotAvailable = fmt.Sprintf("%s; it chose %s here (%s)", noAccelSwitch, onOff(m.accel), m.accelReason)
			}
		}
	}

	type target struct {
		client string
		addrs  map[string]string // workload kind -> address
		procs  func() map[string]int
	}
	podIP := func(key string) (string, error) {
		p, err := r.lab.Pod(key)
		if err != nil {
			return "", err
		}
		return p.IP, nil
	}
	direct := func(ip string) map[string]string {
		return map[string]string{
			load.KindHTTP: net.JoinHostPort(ip, strconv.Itoa(load.DefaultHTTPPort)),
			load.KindRR:   net.JoinHostPort(ip, strconv.Itoa(load.DefaultEchoPort)),
			load.KindCRR:  net.JoinHostPort(ip, strconv.Itoa(load.DefaultEchoPort)),
			load.KindBulk: net.JoinHostPort(ip, strconv.Itoa(load.DefaultSinkPort)),
		}
	}
	targets := map[string]target{}
	serverIP, err := podIP(podServer)
	if err != nil {
		return nil, fmt.Errorf("bench lab: %w", err)
	}
	localIP, err := podIP(podServerL)
	if err != nil {
		return nil, fmt.Errorf("bench lab: %w", err)
	}
	noProcs := func() map[string]int { return nil }
	targets[scenarioLoopback] = target{client: podServer, addrs: direct("127.0.0.1"), procs: noProcs}
	targets[scenarioNoMesh] = target{client: podClient, addrs: direct(serverIP), procs: noProcs}
	targets[scenarioNoMeshLoc] = target{client: podClient, addrs: direct(localIP), procs: noProcs}
	if sidecarErr == nil {
		lo := "127.0.0.1"
		targets[scenarioHAProxy] = target{
			client: podSCClient,
			addrs: map[string]string{
				load.KindHTTP: net.JoinHostPort(lo, strconv.Itoa(outPort(0, 0))),
				load.KindRR:   net.JoinHostPort(lo, strconv.Itoa(outPort(0, 1))),
				load.KindCRR:  net.JoinHostPort(lo, strconv.Itoa(outPort(0, 1))),
				load.KindBulk: net.JoinHostPort(lo, strconv.Itoa(outPort(0, 2))),
			},
			procs: func() map[string]int {
				return map[string]int{"haproxy " + podSCClient: r.sidecars[podSCClient], "haproxy " + podSCServer: r.sidecars[podSCServer]}
			},
		}
		// The same sidecar processes, through their HTTP-mode listeners:
		// HTTP workloads only.
		targets[scenarioHAProxyL7] = target{
			client: podSCClient,
			addrs:  map[string]string{load.KindHTTP: net.JoinHostPort(lo, strconv.Itoa(outPort(0, portHTTPMode)))},
			procs:  targets[scenarioHAProxy].procs,
		}
	}

	if meshErr == nil {
		meshIP, err := podIP(podMeshServer)
		if err != nil {
			return nil, fmt.Errorf("bench lab: %w", err)
		}
		meshLocalIP, err := podIP(podMeshServerL)
		if err != nil {
			return nil, fmt.Errorf("bench lab: %w", err)
		}
		targets[scenarioMeshCross] = target{client: podMeshClient, addrs: direct(meshIP), procs: func() map[string]int {
			return map[string]int{"agent " + node1: m.Agents[node1].Pid, "agent " + node2: m.Agents[node2].Pid}
		}}
		targets[scenarioMeshLocal] = target{client: podMeshClient, addrs: direct(meshLocalIP), procs: func() map[string]int {
			return map[string]int{"agent " + node1: m.Agents[node1].Pid}
		}}
		// L7: the opted-in Service's ClusterIP, HTTP workloads only.
		if svc, err := r.lab.Service(svcMeshL7); err != nil {
			setNotAvailable(res.Scenario, scenarioL7, "the bench lab has no L7 Service: "+err.Error())
		} else {
			targets[scenarioL7] = target{client: podMeshClient,
				addrs: map[string]string{load.KindHTTP: net.JoinHostPort(svc.ClusterIP, strconv.Itoa(svcMeshL7Port))},
				procs: targets[scenarioMeshCross].procs}
		}
	}
	if podErr == nil {
		psIP, err := podIP(podPSServer)
		if err != nil {
			return nil, fmt.Errorf("bench lab: %w", err)
		}
		targets[scenarioMeshSide] = target{client: podPSClient, addrs: direct(psIP), procs: func() map[string]int {
			return map[string]int{"agent " + podPSClient: m.pods[podPSClient].Pid, "agent " + podPSServer: m.pods[podPSServer].Pid}
		}}
	}

	p := o.Profile
	type wl struct {
		name string
		cfg  load.Config
	}
	var wls []wl
	for _, c := range p.HTTPConns {
		wls = append(wls, wl{httpWorkload(p.HTTPRate, c), load.Config{Kind: load.KindHTTP, Conns: c, Rate: p.HTTPRate, Size: p.Size, Warmup: p.Warmup, Duration: p.Duration}})
	}
	wls = append(wls,
		wl{workloadRR, load.Config{Kind: load.KindRR, Warmup: p.Warmup, Duration: p.Duration}},
		wl{workloadCRR, load.Config{Kind: load.KindCRR, Warmup: p.Warmup, Duration: p.Duration}},
		wl{workloadBulk, load.Config{Kind: load.KindBulk, Warmup: p.Warmup, Duration: p.Duration}},
	)

	// Interleave: round r runs every workload of every scenario, scenarios
	// in turn per workload, so slow drift of the machine spreads evenly.
	for round := 1; round <= p.Rounds; round++ {
		for _, w := range wls {
			for _, sc := range res.Scenario {
				t, ok := targets[sc.Name]
				if !ok || sc.NotAvailable != "" {
					continue
				}
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				cfg := w.cfg
				cfg.Addr = t.addrs[cfg.Kind]
				if cfg.Addr == "" {
					continue // (e) runs the HTTP workloads only
				}
				var wait func() []string
				if o.ProfileDir != "" && round == 1 && sc.Name == scenarioMeshCross {
					switch w.name {
					case workloadBulk, httpWorkload(p.HTTPRate, 16):
						wait = r.profileAgents(ctx, cfg.Warmup+cfg.Duration, o.ProfileDir, w.name, false)
					case httpWorkload(p.HTTPRate, 1):
						wait = r.profileAgents(ctx, cfg.Warmup+cfg.Duration, o.ProfileDir, w.name, true)
					}
				}
				if o.ProfileDir != "" && round == 1 && sc.Name == scenarioL7 && w.name == httpWorkload(p.HTTPRate, 16) {
					// Issue 15's headline: where the L7 agents' CPU per
					// request goes.
					wait = r.profileAgents(ctx, cfg.Warmup+cfg.Duration, o.ProfileDir, "l7-"+w.name, false)
				}
				var f0 foreignSample
				if foreign != nil {
					if f0, err = foreign.sample(); err != nil {
						r.log.Warn("measuring other processes' CPU", "err", err)
						res.Machine.ForeignMeasured, foreign = false, nil
					}
				}
				run := r.runOne(ctx, t.client, cfg, t.procs())
				if foreign != nil {
					f1, err := foreign.sample()
					if err != nil {
						r.log.Warn("measuring other processes' CPU", "err", err)
						res.Machine.ForeignMeasured, foreign = false, nil
					} else {
						run.ForeignCPU = foreign.share(f0, f1)
						res.Machine.ForeignCPU = max(res.Machine.ForeignCPU, run.ForeignCPU)
					}
				}
				if wait != nil {
					res.Profiles = append(res.Profiles, wait()...)
				}
				run.Scenario, run.Workload, run.Round = sc.Name, w.name, round
				r.log.Info("bench run", "scenario", sc.Name, "workload", w.name, "round", round, "err", run.Error)
				res.Runs = append(res.Runs, run)
			}
		}
	}

	// The end of the measured runs; the scaling points below start many
	// pods of their own.
	res.Machine.LoadEnd, res.Machine.PressureEnd = machineLoad()
	res.Scaling = r.scaling(ctx, sidecarErr, meshErr, podErr)
	res.Summary, err = summarize(res.Scenario, res.Runs)
	if err != nil {
		return nil, err
	}
	if s, ok := find(res.Summary, scenarioNoMesh, httpWorkload(p.HTTPRate, p.HTTPConns[0])); !ok || s.Rounds == 0 {
		return res, fmt.Errorf("the no-mesh baseline produced no results: see the runs in results.json")
	}
	res.Targets = judgeTargets(res)
	res.Elapsed = time.Since(res.Started)
	return res, nil
}

// setNotAvailable marks a scenario as not available for why.
func setNotAvailable(scs []Scenario, name, why string) {
	for i := range scs {
		if scs[i].Name == name {
			scs[i].NotAvailable = why
		}
	}
}

// LinkWorker makes (or replaces) the WorkerName symlink to this
// executable in dir and returns its path: the program that pod commands
// and Exec calls name to run the benchmark's server and load generator.
// Callers that bring up their own lab (Options.Lab) need it for Spec.
func LinkWorker(dir string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("finding this executable for the in-pod workers: %w", err)
	}
	p := filepath.Join(dir, WorkerName)
	if cur, err := os.Readlink(p); err == nil && cur == exe {
		return p, nil
	}
	_ = os.Remove(p)
	if err := os.Symlink(exe, p); err != nil {
		return "", fmt.Errorf("linking the in-pod worker: %w", err)
	}
	return p, nil
}

// runOne runs one workload in a pod and samples the proxies around it:
// their memory after it, and their CPU time both over the whole run and,
// read by the worker at its edges, over the measured window alone.
func (r *runner) runOne(ctx context.Context, pod string, cfg load.Config, procs map[string]int) RunRecord {
	var run RunRecord
	names := make([]string, 0, len(procs))
	for name := range procs {
		names = append(names, name)
	}
	sort.Strings(names)
	before := map[string]procSample{}
	cfg.WatchPids = cfg.WatchPids[:0:0]
	for _, name := range names {
		if s, err := readProc(procs[name]); err == nil {
			before[name] = s
		}
		cfg.WatchPids = append(cfg.WatchPids, procs[name])
	}
	res, err := r.work1(ctx, pod, cfg)
	if err != nil {
		run.Error = err.Error()
		return run
	}
	run.Result = res
	for i, name := range names {
		pid := procs[name]
		s, err := readProc(pid)
		b, ok := before[name]
		if err != nil || !ok {
			run.Error = fmt.Sprintf("proxy %s (pid %d) is gone: %v", name, pid, err)
			continue
		}
		u := ProxyUsage{Name: name, Pid: pid, RunCPUNanos: s.CPUNanos - b.CPUNanos, RSS: s.RSS, HWM: s.HWM}
		if len(res.WatchCPU) == len(names) {
			u.CPUNanos = res.WatchCPU[i]
		}
		run.Proxies = append(run.Proxies, u)
	}
	return run
}

// work1 runs the worker in the pod and decodes its result.
func (r *runner) work1(ctx context.Context, pod string, cfg load.Config) (*load.Result, error) {
	js, err := json.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encoding the workload: %w", err)
	}
	rctx, cancel := context.WithTimeout(ctx, cfg.Warmup+cfg.Duration+2*time.Minute)
	defer cancel()
	out, err := r.lab.Exec(rctx, pod, []string{r.worker, "run", string(js)})
	if err != nil {
		return nil, err
	}
	// The result is the last JSON line; anything else is diagnostics.
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	last := lines[len(lines)-1]
	var res load.Result
	if err := json.Unmarshal(last, &res); err != nil {
		return nil, fmt.Errorf("decoding the worker's result in %s: %w (output %q)", pod, err, truncate(string(out), 300))
	}
	return &res, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// setupSidecars issues SVIDs and starts HAProxy in the sidecar client and
// server pod.
func (r *runner) setupSidecars(ctx context.Context) error {
	bin, err := haproxyBinary()
	if err != nil {
		return err
	}
	r.haproxy = bin
	if r.ca, err = newSidecarCA(trustDomain); err != nil {
		return err
	}
	if err := r.startServerSidecar(ctx, podSCServer); err != nil {
		return err
	}
	return r.startClientSidecar(ctx, []string{podSCServer})
}

func (r *runner) svid(pod string) (svidFiles, string, error) {
	p, err := r.lab.Pod(pod)
	if err != nil {
		return svidFiles{}, "", err
	}
	dir := filepath.Join(r.work, "sidecars", p.Namespace+"-"+p.Name)
	r.serial++
	f, err := r.ca.issue(dir, fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, p.Namespace, p.ServiceAccount), r.serial+1)
	return f, dir, err
}

func (r *runner) startServerSidecar(ctx context.Context, pod string) error {
	f, dir, err := r.svid(pod)
	if err != nil {
		return err
	}
	pid, err := startHAProxy(ctx, r.lab, pod, r.haproxy, dir, haproxyConf{Cert: f.Cert, Bundle: f.Bundle, Server: true})
	if err != nil {
		return err
	}
	r.sidecars[pod] = pid
	return nil
}

func (r *runner) startClientSidecar(ctx context.Context, servers []string) error {
	if pid, ok := r.sidecars[podSCClient]; ok {
		stopPid(pid)
		delete(r.sidecars, podSCClient)
	}
	f, dir, err := r.svid(podSCClient)
	if err != nil {
		return err
	}
	c := haproxyConf{Cert: f.Cert, Bundle: f.Bundle}
	for i, s := range servers {
		p, err := r.lab.Pod(s)
		if err != nil {
			return err
		}
		c.Upstreams = append(c.Upstreams, haproxyUpstream{Index: i, IP: p.IP})
	}
	pid, err := startHAProxy(ctx, r.lab, podSCClient, r.haproxy, dir, c)
	if err != nil {
		return err
	}
	r.sidecars[podSCClient] = pid
	return nil
}

// stopPid ends a sidecar this run started and waits briefly for it.
func stopPid(pid int) {
	if pid <= 0 {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for i := 0; i < 100; i++ {
		if err := syscall.Kill(pid, 0); err != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

func (r *runner) stopSidecars() {
	for pod, pid := range r.sidecars {
		stopPid(pid)
		delete(r.sidecars, pod)
	}
}

// scaling measures the proxies' cost with 1, 10, 50 ... pods per node:
// the sidecar scenario gets that many server pods on node-2, each with its
// sidecar, and 1000 requests/s spread over all of them.
func (r *runner) scaling(ctx context.Context, sidecarErr, meshErr, podErr error) []ScalePoint {
	var out []ScalePoint
	p := r.o.Profile
	if !r.selected(scenarioMeshCross, scenarioMeshSide, scenarioHAProxy) {
		return nil // nothing selected has cost points
	}
	for _, n := range p.PodsPerNode {
		if err := r.growLab(ctx, n); err != nil {
			out = append(out, ScalePoint{Scenario: scenarioMeshCross, PodsPerNode: n, Error: err.Error()},
				ScalePoint{Scenario: scenarioMeshSide, PodsPerNode: n, Error: err.Error()},
				ScalePoint{Scenario: scenarioHAProxy, PodsPerNode: n, Error: err.Error()})
			continue
		}
		mp := ScalePoint{Scenario: scenarioMeshCross, PodsPerNode: n}
		if !r.selected(scenarioMeshCross) {
			mp.NotAvailable = notSelected
		} else if meshErr != nil {
			mp.NotAvailable = "nodemesh did not start: " + meshErr.Error()
		} else if err := r.scaleMesh(ctx, n, &mp); err != nil {
			mp.Error = err.Error()
			r.log.Warn("nodemesh scale point failed", "pods", n, "err", err)
		}
		out = append(out, mp)
		pp := ScalePoint{Scenario: scenarioMeshSide, PodsPerNode: n}
		if !r.selected(scenarioMeshSide) {
			pp.NotAvailable = notSelected
		} else if podErr != nil {
			pp.NotAvailable = "the per-pod agents did not start: " + podErr.Error()
		} else if err := r.scalePodSidecars(ctx, n, &pp); err != nil {
			pp.Error = err.Error()
			r.log.Warn("nodemesh sidecar scale point failed", "pods", n, "err", err)
		}
		out = append(out, pp)
		pt := ScalePoint{Scenario: scenarioHAProxy, PodsPerNode: n}
		if !r.selected(scenarioHAProxy) {
			pt.NotAvailable = notSelected
			out = append(out, pt)
			continue
		}
		if sidecarErr != nil {
			pt.NotAvailable = sidecarErr.Error()
			out = append(out, pt)
			continue
		}
		if err := r.scaleSidecars(ctx, n, &pt); err != nil {
			pt.Error = err.Error()
			r.log.Warn("sidecar scale point failed", "pods", n, "err", err)
		}
		out = append(out, pt)
	}
	return out
}

// growLab adds the server pods for n pods per node to the lab.
func (r *runner) growLab(ctx context.Context, n int) error {
	sp, err := Spec(r.worker, n)
	if err != nil {
		return err
	}
	// Keep whatever else the lab runs (a caller's lab may hold more).
	cur := r.lab.Spec()
	have := map[string]bool{}
	for _, q := range cur.Pods {
		have[q.Key()] = true
	}
	for _, q := range sp.Pods {
		if !have[q.Key()] {
			cur.Pods = append(cur.Pods, q)
		}
	}
	if err := r.lab.Apply(ctx, cur); err != nil {
		return fmt.Errorf("adding server pods: %w", err)
	}
	return r.tunePods()
}

// tunePods lets the benchmark's pods reuse TIME_WAIT ports for new
// connections (tcp_tw_reuse=1, per network namespace): tcp-crr opens
// thousands of connections a second to one destination, which would
// otherwise exhaust the ephemeral ports within seconds and measure that
// instead. Every scenario's pods get the same setting.
func (r *runner) tunePods() error {
	for _, p := range r.lab.Pods() {
		if p.Namespace != benchNS && p.Namespace != meshNS {
			continue
		}
		if err := netns.WriteSysctl(p.Netns, "net/ipv4/tcp_tw_reuse", "1"); err != nil {
			return fmt.Errorf("tuning pod %s: %w", p.Key(), err)
		}
	}
	return nil
}

// scaleMesh measures the agents with n server pods on node-2.
func (r *runner) scaleMesh(ctx context.Context, n int, pt *ScalePoint) error {
	p := r.o.Profile
	if err := r.waitCaptured(ctx, r.mesh, meshPods(n)); err != nil {
		return err
	}
	var addrs []string
	for _, key := range meshServerPods(n) {
		pod, err := r.lab.Pod(key)
		if err != nil {
			return err
		}
		addrs = append(addrs, net.JoinHostPort(pod.IP, strconv.Itoa(load.DefaultHTTPPort)))
	}
	procs := map[string]int{"agent " + node1: r.mesh.Agents[node1].Pid, "agent " + node2: r.mesh.Agents[node2].Pid}
	cfg := load.Config{Kind: load.KindHTTP, Addr: addrs[0], Addrs: addrs, Conns: max(16, n), Rate: p.HTTPRate, Size: p.Size, Warmup: p.Warmup, Duration: p.Duration}
	run := r.runOne(ctx, podMeshClient, cfg, procs)
	if run.Result == nil {
		return errors.New(run.Error)
	}
	return fillScalePoint(pt, run, func(u ProxyUsage) bool { return u.Name == "agent "+node2 })
}

// fillScalePoint sums a scale run: CPU of every proxy, memory of those
// onServerNode says are on node-2.
func fillScalePoint(pt *ScalePoint, run RunRecord, onServerNode func(ProxyUsage) bool) error {
	var cpu int64
	for _, u := range run.Proxies {
		cpu += u.CPUNanos
		if onServerNode(u) {
			pt.Proxies++
			pt.RSS += u.RSS
			pt.HWM += u.HWM
		}
	}
	pt.Requests, pt.Errors = run.Result.Requests, run.Result.Errors
	if pt.Requests > 0 {
		pt.CPUPer1000 = float64(cpu) / 1e9 / float64(pt.Requests) * 1000
	}
	if h, err := histOf(run.Result); err == nil {
		pt.P99 = us(h.Quantile(0.99))
	}
	if run.Result.Errors > 0 {
		return fmt.Errorf("%d of %d requests failed, first: %s", run.Result.Errors, run.Result.Errors+run.Result.Requests, run.Result.FirstError)
	}
	return nil
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func (r *runner) scaleSidecars(ctx context.Context, n int, pt *ScalePoint) error {
	p := r.o.Profile
	servers := sidecarServerPods(n)
	for _, s := range servers {
		if _, ok := r.sidecars[s]; ok {
			continue
		}
		if err := r.startServerSidecar(ctx, s); err != nil {
			return err
		}
	}
	if err := r.startClientSidecar(ctx, servers); err != nil {
		return err
	}
	var addrs []string
	for i := range servers {
		addrs = append(addrs, net.JoinHostPort("127.0.0.1", strconv.Itoa(outPort(i, 0))))
	}
	procs := map[string]int{}
	for pod, pid := range r.sidecars {
		procs[pod] = pid
	}
	cfg := load.Config{Kind: load.KindHTTP, Addrs: addrs, Conns: max(16, n), Rate: p.HTTPRate, Size: p.Size, Warmup: p.Warmup, Duration: p.Duration}
	cfg.Addr = addrs[0]
	run := r.runOne(ctx, podSCClient, cfg, procs)
	if run.Result == nil {
		return errors.New(run.Error)
	}
	return fillScalePoint(pt, run, func(u ProxyUsage) bool {
		pod, err := r.lab.Pod(u.Name)
		return u.Name != podSCClient && err == nil && pod.Node == node2
	})
}

func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func machineLimits() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Kernel: kernelRelease(), GoVersion: runtime.Version()}
	m.LoadStart, m.PressureStart = machineLoad()
	m.AESGCMBytesPerCPUSecond = aesGCMThroughput()
	return m
}

// machineLoad returns the load averages and the CPU pressure line.
func machineLoad() (load, pressure string) {
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(b))
		if len(f) >= 3 {
			load = strings.Join(f[:3], " ")
		}
	}
	if b, err := os.ReadFile("/proc/pressure/cpu"); err == nil {
		pressure = strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0])
	}
	return load, pressure
}
