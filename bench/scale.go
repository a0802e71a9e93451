package bench

import (
	"bufio"
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
	"slices"
	"strconv"
	"strings"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/bench/load"
	"github.com/nodemesh/nodemesh/lab"
	labmesh "github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/spec"
	"github.com/nodemesh/nodemesh/manifests"
)

// ScaleProfile sizes a scale run: one real agent (with its own real
// pods carrying traffic) against a real API server loaded with a
// synthetic cluster of Points pods, at rest and under churn.
type ScaleProfile struct {
	Name string `json:"name"`
	// Points are the synthetic pod counts, ascending; each point adds to
	// the previous one.
	Points []int `json:"points"`
	// ChurnRate is the pod label changes per second of the churn phase,
	// Churn how long the agent's CPU and API traffic are measured under it.
	ChurnRate float64       `json:"churnRate"`
	Churn     time.Duration `json:"churn"`
	// Idle is the at-rest window for CPU and API traffic.
	Idle time.Duration `json:"idle"`
	// Probes is the number of probe cycles per condition; each cycle
	// gives two NetworkPolicy and two pod-label change-to-enforcement
	// samples.
	Probes int `json:"probes"`
	// CRR is the duration of the connection-per-exchange run (tcp-crr)
	// through the agent, per condition.
	CRR time.Duration `json:"crr"`
	// Workers is the loader's and churner's API concurrency.
	Workers int `json:"workers"`
	// MarkNodes is how many nodes' marks (Leases) are renewed every
	// MarkRenew in the marks condition, as their agents would (0: no
	// marks condition). Its window is Churn's.
	MarkNodes int           `json:"markNodes,omitempty"`
	MarkRenew time.Duration `json:"markRenew,omitempty"`
}

// ScaleProfiles by name; "scale:1000,20000" is "scale" at other points.
var ScaleProfiles = map[string]ScaleProfile{
	"scale": {Name: "scale", Points: []int{1000, 10000, 100000}, ChurnRate: 100, Churn: 30 * time.Second,
		Idle: 30 * time.Second, Probes: 10, CRR: 5 * time.Second, Workers: 32,
		MarkNodes: 5000, MarkRenew: rollout.DefaultRenewInterval},
	// scale-smoke is for CI: a tiny point that runs every phase.
	"scale-smoke": {Name: "scale-smoke", Points: []int{200}, ChurnRate: 20, Churn: 3 * time.Second,
		Idle: 3 * time.Second, Probes: 2, CRR: time.Second, Workers: 8,
		MarkNodes: 20, MarkRenew: time.Second},
}

// IsScaleProfile reports whether name names a scale profile.
func IsScaleProfile(name string) bool {
	base, _, _ := strings.Cut(name, ":")
	_, ok := ScaleProfiles[base]
	return ok
}

// ScaleProfileByName returns a scale profile; "NAME:N1,N2,..." replaces
// its points (k and m suffixes allowed: scale:1k,10k).
func ScaleProfileByName(name string) (ScaleProfile, error) {
	base, pts, hasPts := strings.Cut(name, ":")
	p, ok := ScaleProfiles[base]
	if !ok {
		return ScaleProfile{}, fmt.Errorf("unknown scale profile %q: use scale or scale-smoke, optionally with points (scale:1k,10k)", base)
	}
	if hasPts {
		p.Points = nil
		for _, f := range strings.Split(pts, ",") {
			f = strings.ToLower(strings.TrimSpace(f))
			mul := 1
			switch {
			case strings.HasSuffix(f, "k"):
				mul, f = 1000, strings.TrimSuffix(f, "k")
			case strings.HasSuffix(f, "m"):
				mul, f = 1000000, strings.TrimSuffix(f, "m")
			}
			n, err := strconv.Atoi(f)
			if err != nil || n < 1 || n*mul > 1000000 {
				return ScaleProfile{}, fmt.Errorf("scale profile %q: point %q is not a pod count between 1 and 1m", name, f)
			}
			p.Points = append(p.Points, n*mul)
		}
		slices.Sort(p.Points)
		p.Points = slices.Compact(p.Points)
	}
	return p, nil
}

// ScaleOptions configure RunScale.
type ScaleOptions struct {
	Profile               ScaleProfile
	StateDir, ID          string // the lab's
	AgentBinary, CABinary string
	Log                   *slog.Logger
	// Lab, if set, is a lab brought up from ScaleSpec(worker) with
	// WorkDir holding the worker link (LinkWorker); RunScale then uses it
	// and leaves it up.
	Lab     *lab.Lab
	WorkDir string
	// ProfileDir, when set, receives a CPU profile of the agent over each
	// point's churn window (agent-<pods>pods-churn.pprof), which says
	// where the CPU per change goes, and a heap profile of it before
	// loading and at each point at rest (agent-<pods>pods-heap.pprof),
	// which says where its live heap goes.
	ProfileDir string
}

// ScaleResults is everything a scale run measured.
type ScaleResults struct {
	Profile  ScaleProfile `json:"profile"`
	Started  time.Time    `json:"started"`
	Finished time.Time    `json:"finished"`
	CPUs     int          `json:"cpus"`
	// LabUp is the load before the run started (others on the machine).
	LoadBefore string      `json:"loadBefore"`
	Points     []ScaleSize `json:"points"`
	Notes      []string    `json:"notes,omitempty"`
	// Profiles are the agent CPU and heap profiles written to
	// ScaleOptions.ProfileDir.
	Profiles []string `json:"profiles,omitempty"`
	// BaseLiveHeap is the agent's live heap (LiveHeap) before any
	// synthetic object was loaded: the lab's own few objects and its two
	// real pods. A point's LiveHeap minus this, over its pods, is the
	// agent's memory per synthetic pod.
	BaseLiveHeap int64 `json:"baseLiveHeap"`
}

// ScaleSize is one cluster size of a scale run.
type ScaleSize struct {
	Pods  int   `json:"pods"`
	Shape synth `json:"shape"`
	// Load is how long the API server took to take the objects added for
	// this point; LoadAvg the machine's load averages right after.
	Load    loadTimes `json:"load"`
	LoadAvg string    `json:"loadAvg"`
	// CatchUp is from the last object written to the agent knowing the
	// last pod (answering /policy/explain for it).
	CatchUp time.Duration `json:"catchUp"`
	Rest    ScaleCond     `json:"rest"`
	Churn   ScaleCond     `json:"churn"`
	// Marks is the agent while Profile.MarkNodes simulated nodes renew
	// their marks (Changes are renewals); MarksAsked the renewals per
	// second asked for. The Leases stay for the restart that follows.
	Marks      ScaleCond `json:"marks"`
	MarksAsked float64   `json:"marksAsked,omitempty"`
	// Restart is an agent restart at this size: stop, start, until ready
	// and the last pod known.
	Restart    time.Duration `json:"restart"`
	RestartAPI apiCount      `json:"restartAPI"`
	// LiveHeap is the agent's live heap at rest, after the rest window:
	// the Go heap's allocated bytes right after a forced collection
	// (HeapAlloc from /debug/pprof/heap?gc=1), so, unlike RSS and heap in
	// use, it holds no garbage the collector has not reclaimed yet.
	LiveHeap int64  `json:"liveHeap"`
	Error    string `json:"error,omitempty"`
}

// ScaleCond is the agent measured in one condition (at rest or churn).
type ScaleCond struct {
	Window  time.Duration `json:"window"`
	LoadAvg string        `json:"loadAvg"`
	// Agent memory at the end of the window: RSS, peak RSS, Go heap in use.
	RSS       int64 `json:"rss"`
	HWM       int64 `json:"hwm"`
	HeapInuse int64 `json:"heapInuse"`
	// CPU is the agent's CPU in cores over the window.
	CPU float64 `json:"cpuCores"`
	// Changes made in the window (churn only), their achieved rate, and
	// the agent CPU per change.
	Changes       int64   `json:"changes"`
	ChangeErrors  int64   `json:"changeErrors"`
	ChangesLate   int64   `json:"changesLate"`
	ChangesPerSec float64 `json:"changesPerSec"`
	CPUPerChange  float64 `json:"cpuMsPerChange"`
	// API traffic of the agent over the window.
	API apiCount `json:"api"`
	// Change to enforcement, seen in the agent's /policy/explain.
	Netpol Latency `json:"netpolToEnforced"`
	Label  Latency `json:"labelToEnforced"`
	// CRR is tcp-crr (a new connection per 1-byte exchange) through the
	// agent: every connection takes a policy decision on the data path.
	CRR      Latency `json:"crr"`
	CRRError string  `json:"crrError,omitempty"`
}

// Latency summarises samples.
type Latency struct {
	N        int           `json:"n"`
	P50      time.Duration `json:"p50"`
	P99      time.Duration `json:"p99"`
	Max      time.Duration `json:"max"`
	Timeouts int           `json:"timeouts,omitempty"`
}

func latencyOf(ds []time.Duration, timeouts int) Latency {
	l := Latency{N: len(ds), Timeouts: timeouts}
	if len(ds) == 0 {
		return l
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	l.P50, l.P99, l.Max = q(0.5), q(0.99), s[len(s)-1]
	return l
}

// The scale lab: one node with an agent, a client and a server enrolled
// in the mesh (the probes' subjects and the data path).
const (
	scaleNS     = "scale-mesh"
	scaleNode   = "node-1"
	scaleClient = scaleNS + "/client"
	scaleServer = scaleNS + "/server"
	probeLabel  = "probe"
	probePolicy = "probe"
)

// ScaleSpec is the scale profile's lab; worker is the LinkWorker path.
func ScaleSpec(worker string) (*spec.Spec, error) {
	sp := &spec.Spec{APIVersion: spec.APIVersion, Kind: spec.Kind,
		Nodes:      []spec.Node{{Name: scaleNode}},
		Namespaces: []spec.Namespace{{Name: scaleNS, Labels: map[string]string{state.LabelMode: state.ModeEnabled}}},
		Pods: []spec.Pod{
			{Name: "client", Namespace: scaleNS, Node: scaleNode, ServiceAccount: "client",
				Labels: map[string]string{"app": "client"}, Command: []string{"nodemeshctl", "lab", "workload", "sleep"}},
			{Name: "server", Namespace: scaleNS, Node: scaleNode, ServiceAccount: "server",
				Labels: map[string]string{"app": "server"}, Command: []string{worker, "serve"},
				Ports: []spec.ContainerPort{{Name: "echo", ContainerPort: load.DefaultEchoPort}}},
		},
	}
	sp.Default()
	if err := sp.Validate("scale"); err != nil {
		return nil, fmt.Errorf("scale lab spec: %w", err)
	}
	return sp, nil
}

type scaleRun struct {
	o      ScaleOptions
	log    *slog.Logger
	lab    *lab.Lab
	mesh   *labmesh.Mesh
	api    *apiCounter
	c      kubernetes.Interface
	worker string
	// profiles are the files profileWindow wrote, for ScaleResults.
	profiles []string
}

// RunScale runs a scale profile. It returns what it measured even on
// error (points measured so far).
func RunScale(ctx context.Context, o ScaleOptions) (res *ScaleResults, err error) {
	if len(o.Profile.Points) == 0 || o.Profile.Workers < 1 || !(o.Profile.ChurnRate > 0) {
		return nil, fmt.Errorf("scale profile %q: needs points, workers and a churn rate", o.Profile.Name)
	}
	s := &scaleRun{o: o, log: o.Log}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	load, _ := machineLoad()
	res = &ScaleResults{Profile: o.Profile, Started: time.Now().UTC(), CPUs: runtime.NumCPU(), LoadBefore: load}
	defer func() { res.Finished = time.Now().UTC() }()
	work := o.WorkDir
	if work == "" {
		if work, err = os.MkdirTemp("", "nmscale-"); err != nil {
			return res, fmt.Errorf("creating a work directory: %w", err)
		}
		defer os.RemoveAll(work)
	}
	if s.worker, err = LinkWorker(work); err != nil {
		return res, err
	}
	s.lab = o.Lab
	if s.lab == nil {
		sp, err := ScaleSpec(s.worker)
		if err != nil {
			return res, err
		}
		s.log.Info("bringing up the scale lab", "dir", o.StateDir)
		if s.lab, err = lab.Up(ctx, sp, lab.Options{StateDir: o.StateDir, ID: o.ID, Log: s.log}); err != nil {
			return res, fmt.Errorf("bringing up the scale lab: %w", err)
		}
		defer func() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
			defer cancel()
			if derr := s.lab.Down(dctx); derr != nil {
				err = errors.Join(err, fmt.Errorf("taking the scale lab down: %w", derr))
			}
		}()
	}
	rc := rest.CopyConfig(s.lab.Server.REST)
	rc.QPS, rc.Burst = 100000, 100000 // the loader paces itself by its workers
	if s.c, err = kubernetes.NewForConfig(rc); err != nil {
		return res, fmt.Errorf("creating the loader's client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return res, fmt.Errorf("creating the loader's dynamic client: %w", err)
	}
	if err := installCRDs(ctx, dyn); err != nil {
		res.Notes = append(res.Notes, "no AuthorizationPolicies: "+err.Error())
		dyn = nil
	}
	n, err := s.lab.Node(scaleNode)
	if err != nil {
		return res, err
	}
	if s.api, err = startAPICounter(n.Netns, s.lab.Server.REST); err != nil {
		return res, err
	}
	defer s.api.close()
	kc := filepath.Join(work, "agent-kubeconfig")
	if err := s.api.kubeconfig(kc); err != nil {
		return res, err
	}
	s.mesh, err = labmesh.Start(ctx, s.lab, labmesh.Options{AgentBinary: o.AgentBinary, CABinary: o.CABinary, LogLevel: "warn",
		Kubeconfig: map[string]string{scaleNode: kc}, Wait: 5 * time.Minute, Log: s.log,
		// The agent's default: the lab's 2 s would add a discovery read per
		// absent CRD (the Gateway API's are not installed here) every 2 s,
		// 60 reads/min that a real agent does not make.
		CRDRecheck: 30 * time.Second})
	if err != nil {
		return res, fmt.Errorf("starting nodemesh: %w", err)
	}
	defer func() {
		if serr := s.mesh.Stop(context.WithoutCancel(ctx)); serr != nil {
			err = errors.Join(err, serr)
		}
	}()
	// The agent before any synthetic object, settled: what a point's live
	// heap is compared with.
	if err := sleepCtx(ctx, 5*time.Second); err != nil {
		return res, err
	}
	res.BaseLiveHeap = s.liveHeap(ctx, "agent-0pods-heap.pprof")
	ld := &loader{c: s.c, dyn: dyn, workers: o.Profile.Workers}
	defer func() { res.Profiles = s.profiles }()
	for _, pods := range o.Profile.Points {
		pt, err := s.point(ctx, ld, pods)
		if err != nil {
			pt.Error = err.Error()
			res.Points = append(res.Points, pt)
			return res, fmt.Errorf("scale point %d pods: %w", pods, err)
		}
		res.Points = append(res.Points, pt)
	}
	return res, nil
}

// installCRDs installs nodemesh's CRDs from the checkout's manifests.
func installCRDs(ctx context.Context, dyn dynamic.Interface) error {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return errors.New("cannot locate manifests/crds")
	}
	dir := filepath.Join(filepath.Dir(file), "..", "manifests", "crds")
	crds, err := manifests.Render(dir)
	if err != nil {
		return fmt.Errorf("reading the CRDs (run from a nodemesh checkout): %w", err)
	}
	gvr := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		if _, err := dyn.Resource(gvr).Create(ctx, crd, metav1.CreateOptions{}); ignoreExists(err) != nil {
			return fmt.Errorf("installing CRD %s: %w", crd.GetName(), err)
		}
	}
	// Established takes a moment; the loader's first create retries below.
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := dyn.Resource(gvr).Get(ctx, "authorizationpolicies.security.nodemesh.io", metav1.GetOptions{})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for the AuthorizationPolicy CRD: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (s *scaleRun) point(ctx context.Context, ld *loader, pods int) (ScaleSize, error) {
	pt := ScaleSize{Pods: pods, Shape: synthFor(pods)}
	s.log.Info("loading", "pods", pods)
	var err error
	if pt.Load, err = ld.grow(ctx, pt.Shape); err != nil {
		return pt, err
	}
	pt.LoadAvg, _ = machineLoad()
	s.log.Info("loaded", "pods", pods, "took", pt.Load.Total.Round(time.Millisecond), "load", pt.LoadAvg)
	t := time.Now()
	if err := s.waitKnows(ctx, simPodKey(pods-1), 10*time.Minute); err != nil {
		return pt, err
	}
	pt.CatchUp = time.Since(t)
	// Let the agent settle before the at-rest window.
	if err := sleepCtx(ctx, 5*time.Second); err != nil {
		return pt, err
	}
	if pt.Rest, err = s.measure(ctx, nil); err != nil {
		return pt, fmt.Errorf("at rest: %w", err)
	}
	pt.LiveHeap = s.liveHeap(ctx, fmt.Sprintf("agent-%dpods-heap.pprof", pods))
	ch := &churner{c: s.c, pods: pods, rate: s.o.Profile.ChurnRate, workers: s.o.Profile.Workers}
	wait := s.profileWindow(ctx, pods, "churn")
	pt.Churn, err = s.measure(ctx, ch)
	if f := wait(); f != "" {
		s.profiles = append(s.profiles, f)
	}
	if err != nil {
		return pt, fmt.Errorf("under churn: %w", err)
	}
	if n := s.o.Profile.MarkNodes; n > 0 {
		m := &marker{c: s.c, nodes: n, interval: s.o.Profile.MarkRenew, workers: s.o.Profile.Workers}
		if err := m.create(ctx); err != nil {
			return pt, err
		}
		pt.MarksAsked = m.rate()
		wait := s.profileWindow(ctx, pods, "marks")
		pt.Marks, err = s.measure(ctx, m)
		if f := wait(); f != "" {
			s.profiles = append(s.profiles, f)
		}
		if err != nil {
			return pt, fmt.Errorf("under node-mark renewals: %w", err)
		}
	}
	before := s.api.read()
	t = time.Now()
	if err := s.mesh.RestartAgent(ctx, scaleNode); err != nil {
		return pt, err
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	for s.mesh.Ready(rctx, scaleNode) != nil {
		if err := sleepCtx(rctx, 50*time.Millisecond); err != nil {
			return pt, fmt.Errorf("waiting for the restarted agent to be ready: %w", err)
		}
	}
	if err := s.waitKnows(ctx, simPodKey(pods-1), 10*time.Minute); err != nil {
		return pt, err
	}
	pt.Restart = time.Since(t)
	pt.RestartAPI = s.api.read().minus(before)
	s.log.Info("point done", "pods", pods, "restart", pt.Restart.Round(time.Millisecond))
	return pt, nil
}

// profileWindow starts a CPU profile of the agent over the churn or marks
// window (cond) that measure is about to run, if ScaleOptions.ProfileDir
// is set; wait returns the file written ("" if none). The profiler's own
// cost (a sample 100 times a second) is in that window's figures.
func (s *scaleRun) profileWindow(ctx context.Context, pods int, cond string) (wait func() string) {
	if s.o.ProfileDir == "" {
		return func() string { return "" }
	}
	secs := max(1, int(s.o.Profile.Churn/time.Second))
	done := make(chan string, 1)
	go func() {
		name := fmt.Sprintf("agent-%dpods-%s.pprof", pods, cond)
		b, err := s.mesh.Fetch(ctx, scaleNode, labmesh.AdminURL+fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), s.o.Profile.Churn+time.Minute)
		if err == nil {
			err = os.MkdirAll(s.o.ProfileDir, 0o755)
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(s.o.ProfileDir, name), b, 0o644)
		}
		if err != nil {
			s.log.Warn("profiling the agent failed", "pods", pods, "condition", cond, "err", err)
			name = ""
		}
		done <- name
	}()
	return func() string { return <-done }
}

// changer is a load the scale profile measures the agent under: pod
// churn or node-mark renewals.
type changer interface {
	run(ctx context.Context)
	counts() (done, errs, late int64)
}

// measure runs one condition: the agent's CPU, memory and API traffic
// over the window (with ch making changes, if not nil), then the
// change-to-enforcement probes and tcp-crr (ch still running).
func (s *scaleRun) measure(ctx context.Context, ch changer) (ScaleCond, error) {
	var c ScaleCond
	window := s.o.Profile.Idle
	cctx, stopChurn := context.WithCancel(ctx)
	churnDone := make(chan struct{})
	if ch != nil {
		window = s.o.Profile.Churn
		go func() { defer close(churnDone); ch.run(cctx) }()
	} else {
		close(churnDone)
	}
	defer func() { stopChurn(); <-churnDone }()
	pid := s.mesh.Agents[scaleNode].Pid
	p0, err := readProc(pid)
	if err != nil {
		return c, err
	}
	a0, t0 := s.api.read(), time.Now()
	var n0 int64
	if ch != nil {
		n0, _, _ = ch.counts()
	}
	if err := sleepCtx(ctx, window); err != nil {
		return c, err
	}
	p1, err := readProc(pid)
	if err != nil {
		return c, err
	}
	c.Window = time.Since(t0)
	c.API = s.api.read().minus(a0)
	c.CPU = float64(p1.CPUNanos-p0.CPUNanos) / float64(c.Window)
	c.RSS, c.HWM = p1.RSS, p1.HWM
	c.HeapInuse = s.heapInuse(ctx)
	c.LoadAvg, _ = machineLoad()
	if ch != nil {
		n1, _, _ := ch.counts()
		c.Changes = n1 - n0
		c.ChangesPerSec = float64(c.Changes) / c.Window.Seconds()
		if c.Changes > 0 {
			c.CPUPerChange = float64(p1.CPUNanos-p0.CPUNanos) / float64(c.Changes) / 1e6
		}
	}
	np, lbl, timeouts, err := s.probes(ctx)
	if err != nil {
		return c, err
	}
	c.Netpol, c.Label = latencyOf(np, timeouts), latencyOf(lbl, 0)
	c.CRR, err = s.crr(ctx)
	if err != nil {
		c.CRRError = err.Error()
	}
	if ch != nil {
		_, c.ChangeErrors, c.ChangesLate = ch.counts()
	}
	return c, nil
}

// heapInuse reads go_memstats_heap_inuse_bytes from the agent's metrics.
func (s *scaleRun) heapInuse(ctx context.Context) int64 {
	b, err := s.mesh.Metrics(ctx, scaleNode)
	if err != nil {
		return -1
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_inuse_bytes "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return int64(f)
			}
		}
	}
	return -1
}

// liveHeap returns the agent's live heap: HeapAlloc right after a forced
// collection, read from the runtime.MemStats that the heap profile's text
// form ends with (/debug/pprof/heap?gc=1&debug=1 runs runtime.GC first).
// With ScaleOptions.ProfileDir set it also saves a heap profile, taken
// after another collection, as name (go tool pprof -sample_index=inuse_space),
// to say where that memory goes. -1 if it cannot be read.
func (s *scaleRun) liveHeap(ctx context.Context, name string) int64 {
	b, err := s.mesh.Fetch(ctx, scaleNode, labmesh.AdminURL+"/debug/pprof/heap?gc=1&debug=1", time.Minute)
	if err != nil {
		s.log.Warn("reading the agent's live heap failed", "err", err)
		return -1
	}
	live := parseHeapAlloc(b)
	if live < 0 {
		s.log.Warn("no HeapAlloc in the agent's heap profile")
	}
	if s.o.ProfileDir != "" {
		b, err := s.mesh.Fetch(ctx, scaleNode, labmesh.AdminURL+"/debug/pprof/heap?gc=1", time.Minute)
		if err == nil {
			err = os.MkdirAll(s.o.ProfileDir, 0o755)
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(s.o.ProfileDir, name), b, 0o644)
		}
		if err != nil {
			s.log.Warn("saving the agent's heap profile failed", "err", err)
		} else {
			s.profiles = append(s.profiles, name)
		}
	}
	return live
}

// parseHeapAlloc returns the "# HeapAlloc = N" line of a text heap
// profile (runtime/pprof, debug=1), or -1.
func parseHeapAlloc(profile []byte) int64 {
	sc := bufio.NewScanner(bytes.NewReader(profile))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "# HeapAlloc = "); ok {
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				return n
			}
		}
	}
	return -1
}

// waitKnows waits until the agent's policy snapshot knows pod key.
func (s *scaleRun) waitKnows(ctx context.Context, key string, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var last error
	for {
		_, last = s.mesh.Explain(ctx, scaleNode, labmesh.ExplainQuery{Src: key, Dst: scaleServer, Port: load.DefaultEchoPort})
		if last == nil {
			return nil
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("waiting for the agent to know pod %s: %w (last: %w)", key, err, last)
		}
	}
}

// probeTimeout bounds one change-to-enforcement sample.
const probeTimeout = time.Minute

// probes runs the probe cycles: a NetworkPolicy that admits only
// probe=yes clients appears (deny), the client gets the label (allow),
// loses it (deny), the policy goes (allow). Each step is timed from just
// before the API call until the agent's explain answer flips.
func (s *scaleRun) probes(ctx context.Context) (np, lbl []time.Duration, timeouts int, err error) {
	pods := s.c.CoreV1().Pods(scaleNS)
	pols := s.c.NetworkingV1().NetworkPolicies(scaleNS)
	label := func(v string) func(context.Context) error {
		return func(ctx context.Context) error {
			val := "null"
			if v != "" {
				val = strconv.Quote(v)
			}
			_, err := pods.Patch(ctx, "client", types.MergePatchType, []byte(`{"metadata":{"labels":{"`+probeLabel+`":`+val+`}}}`), metav1.PatchOptions{})
			return err
		}
	}
	create := func(ctx context.Context) error {
		_, err := pols.Create(ctx, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: probePolicy},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
					{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{probeLabel: "yes"}}}}}},
			}}, metav1.CreateOptions{})
		return err
	}
	del := func(ctx context.Context) error { return pols.Delete(ctx, probePolicy, metav1.DeleteOptions{}) }
	steps := []struct {
		netpol bool
		change func(context.Context) error
		want   policy.Verdict
	}{
		{true, create, policy.Deny},
		{false, label("yes"), policy.Allow},
		{false, label(""), policy.Deny},
		{true, del, policy.Allow},
	}
	if err := s.waitVerdict(ctx, policy.Allow, probeTimeout); err != nil {
		return nil, nil, 0, fmt.Errorf("before the probes: %w", err)
	}
	for range s.o.Profile.Probes {
		for _, st := range steps {
			t := time.Now()
			if err := st.change(ctx); err != nil {
				return np, lbl, timeouts, fmt.Errorf("probe change: %w", err)
			}
			if err := s.waitVerdict(ctx, st.want, probeTimeout); err != nil {
				if ctx.Err() != nil {
					return np, lbl, timeouts, err
				}
				timeouts++
				s.log.Warn("probe timed out", "err", err)
				continue
			}
			d := time.Since(t)
			if st.netpol {
				np = append(np, d)
			} else {
				lbl = append(lbl, d)
			}
		}
	}
	return np, lbl, timeouts, nil
}

// waitVerdict polls the agent's explain of client -> server until it
// answers want.
func (s *scaleRun) waitVerdict(ctx context.Context, want policy.Verdict, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var last error
	for {
		d, err := s.mesh.Explain(ctx, scaleNode, labmesh.ExplainQuery{Src: scaleClient, Dst: scaleServer, Port: load.DefaultEchoPort})
		if err == nil && d.Verdict == want {
			return nil
		}
		if err != nil {
			last = err
		} else {
			last = fmt.Errorf("verdict %s", d.Verdict)
		}
		if err := sleepCtx(ctx, 2*time.Millisecond); err != nil {
			return fmt.Errorf("waiting for %s: %w (last: %w)", want, err, last)
		}
	}
}

// crr runs tcp-crr from the client to the server through the agent.
func (s *scaleRun) crr(ctx context.Context) (Latency, error) {
	srv, err := s.lab.Pod(scaleServer)
	if err != nil {
		return Latency{}, err
	}
	cfg := load.Config{Kind: load.KindCRR, Addr: net.JoinHostPort(srv.IP, strconv.Itoa(load.DefaultEchoPort)),
		Warmup: 500 * time.Millisecond, Duration: s.o.Profile.CRR}
	js, err := json.Marshal(cfg)
	if err != nil {
		return Latency{}, err
	}
	rctx, cancel := context.WithTimeout(ctx, cfg.Duration+2*time.Minute)
	defer cancel()
	out, err := s.lab.Exec(rctx, scaleClient, []string{s.worker, "run", string(js)})
	if err != nil {
		return Latency{}, fmt.Errorf("tcp-crr: %w", err)
	}
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	var r load.Result
	if err := json.Unmarshal(lines[len(lines)-1], &r); err != nil {
		return Latency{}, fmt.Errorf("decoding the tcp-crr result: %w (output %q)", err, truncate(string(out), 300))
	}
	h, err := histOf(&r)
	if err != nil {
		return Latency{}, err
	}
	l := Latency{N: int(h.Count()), P50: time.Duration(h.Quantile(0.5)), P99: time.Duration(h.Quantile(0.99)), Max: time.Duration(h.Max())}
	if r.Errors > 0 {
		return l, fmt.Errorf("tcp-crr: %d errors (%s)", r.Errors, r.FirstError)
	}
	return l, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
