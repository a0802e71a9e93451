package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/nodemesh/nodemesh/bench/hist"
	"github.com/nodemesh/nodemesh/bench/load"
)

// Results is everything one benchmark run measured; results.json holds it.
type Results struct {
	Profile  Profile       `json:"profile"`
	Started  time.Time     `json:"started"`
	Elapsed  time.Duration `json:"elapsed"`
	Machine  Machine       `json:"machine"`
	Method   []string      `json:"method"`
	Scenario []Scenario    `json:"scenarios"`
	// Runs are the raw measurements, in the order they ran.
	Runs    []RunRecord  `json:"runs"`
	Summary []Summary    `json:"summary"`
	Scaling []ScalePoint `json:"scaling"`
	Targets []Target     `json:"targets"`
	// Profiles are agent CPU profiles written to Options.ProfileDir.
	Profiles []string `json:"profiles,omitempty"`
}

// Machine holds the machine's own limits, measured in the same run.
type Machine struct {
	CPUs int `json:"cpus"`
	// AESGCMBytesPerCPUSecond is single-core AES-128-GCM sealing
	// throughput of Go's crypto over 16 kB records, per second of thread
	// CPU time.
	AESGCMBytesPerCPUSecond float64 `json:"aesGcmBytesPerCpuSecond"`
	Kernel                  string  `json:"kernel"`
	GoVersion               string  `json:"goVersion"`
	// Load at the start and the end of the run: /proc/loadavg and the
	// "some" line of /proc/pressure/cpu. On a shared machine they explain
	// noisy tails.
	LoadStart     string `json:"loadStart"`
	LoadEnd       string `json:"loadEnd"`
	PressureStart string `json:"cpuPressureStart,omitempty"`
	PressureEnd   string `json:"cpuPressureEnd,omitempty"`
	// ForeignCPU is the largest share of the machine's CPU capacity that
	// processes outside the bench (its lab's cgroups and nodemeshctl)
	// used during one measured run; ForeignMeasured says it was measured
	// for every run. When measured, rounds during which it exceeded
	// foreignLimit are left out (disturbedRounds), and the load averages
	// no longer decide whether the machine was too busy to judge.
	ForeignCPU      float64 `json:"foreignCpu,omitempty"`
	ForeignMeasured bool    `json:"foreignCpuMeasured,omitempty"`
}

// Scenario is one way of connecting client and server.
type Scenario struct {
	Name  string `json:"name"`
	Title string `json:"title"`
	// Baseline is the scenario this one's added latency is measured
	// against ("" for baselines).
	Baseline string `json:"baseline,omitempty"`
	// NotAvailable says why the scenario did not run ("" when it ran).
	NotAvailable string `json:"notAvailable,omitempty"`
}

// RunRecord is one workload run of one scenario.
type RunRecord struct {
	Scenario string `json:"scenario"`
	Workload string `json:"workload"`
	Round    int    `json:"round"`
	// Error is set when the run failed as a whole; Result is then nil.
	Error  string       `json:"error,omitempty"`
	Result *load.Result `json:"result,omitempty"`
	// ForeignCPU is the share of the machine's CPU used outside the bench
	// during the run (see Machine.ForeignCPU).
	ForeignCPU float64 `json:"foreignCpu,omitempty"`
	// Proxies are the proxy processes of the scenario during the run.
	Proxies []ProxyUsage `json:"proxies,omitempty"`
}

// ProxyUsage is one proxy process's CPU during a run and memory after it.
type ProxyUsage struct {
	Name string `json:"name"`
	Pid  int    `json:"pid"`
	// CPUNanos is its CPU time during the measured window (the worker
	// reads it at the window's edges: Result.WatchWall long), which the
	// per-request figures divide by the window's requests. RunCPUNanos is
	// its CPU time around the whole worker run: warm-up, connection setup
	// and the worker's start and exit included.
	CPUNanos    int64 `json:"cpuNanos"`
	RunCPUNanos int64 `json:"runCpuNanos"`
	RSS         int64 `json:"rss"`
	HWM         int64 `json:"hwm"`
}

// Summary aggregates the rounds of one scenario and workload: each figure
// is the median over rounds, P99Min/P99Max the spread of p99.
type Summary struct {
	Scenario string `json:"scenario"`
	Workload string `json:"workload"`
	Rounds   int    `json:"rounds"`
	Failed   int    `json:"failed"`
	// Disturbed counts the rounds left out because processes outside the
	// bench used more than foreignLimit of the machine's CPU during this
	// workload's round (in any scenario's run: the round is left out of
	// every scenario's figures, so comparisons stay paired). Busy says
	// every round of the workload was disturbed: they are all kept, and
	// the figures cannot judge a target.
	Disturbed int    `json:"disturbed,omitempty"`
	Busy      bool   `json:"busy,omitempty"`
	Errors    uint64 `json:"errors"`
	// Latency percentiles in microseconds.
	P50    float64 `json:"p50us"`
	P90    float64 `json:"p90us"`
	P99    float64 `json:"p99us"`
	P999   float64 `json:"p999us"`
	P99Min float64 `json:"p99MinUs"`
	P99Max float64 `json:"p99MaxUs"`
	RPS    float64 `json:"rps"`
	// BytesPerSec is payload throughput.
	BytesPerSec float64 `json:"bytesPerSec"`
	// AddedP50/AddedP99 (µs) and RatioP99 compare with the baseline's
	// median on the same workload; zero when there is no baseline.
	AddedP50 float64 `json:"addedP50us,omitempty"`
	AddedP99 float64 `json:"addedP99us,omitempty"`
	RatioP99 float64 `json:"ratioP99,omitempty"`
	// ProxyCPUPer1000 is CPU seconds of all the scenario's proxies per
	// 1000 requests (transactions); ProxyPeakRSS the sum of their VmHWM.
	ProxyCPUPer1000 float64 `json:"proxyCpuSecondsPer1000,omitempty"`
	ProxyPeakRSS    int64   `json:"proxyPeakRssBytes,omitempty"`
	Proxies         int     `json:"proxies"`
	// GeneratorLagP99 (µs) is the load generator's own lateness (HTTP),
	// not charged to the scenario.
	GeneratorLagP99 float64 `json:"generatorLagP99us,omitempty"`
}

// ScalePoint is the proxies' cost with a number of pods per node.
type ScalePoint struct {
	Scenario     string `json:"scenario"`
	PodsPerNode  int    `json:"podsPerNode"`
	NotAvailable string `json:"notAvailable,omitempty"`
	Error        string `json:"error,omitempty"`
	// Proxies counts proxy processes on the server node; RSS sums their
	// resident memory after the load, HWM their peaks.
	Proxies int   `json:"proxies"`
	RSS     int64 `json:"rssBytes"`
	HWM     int64 `json:"hwmBytes"`
	// CPUPer1000 is CPU seconds of every proxy of the path (both nodes)
	// per 1000 requests of the load spread over all pods.
	CPUPer1000 float64 `json:"cpuSecondsPer1000"`
	Requests   uint64  `json:"requests"`
	// Errors are failed requests of the run (Error says the first).
	Errors uint64  `json:"errors,omitempty"`
	P99    float64 `json:"p99us"`
}

// Target is one of the issue's targets, judged on this run's ratios.
type Target struct {
	// Issue is the project issue that set the target.
	Issue    int    `json:"issue"`
	Name     string `json:"name"`
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	// Status is "pass", "miss", "inconclusive" (measured, but too few
	// rounds or an oversubscribed machine to judge) or "not available".
	Status string `json:"status"`
	Note   string `json:"note,omitempty"`
}

func us(ns int64) float64 { return float64(ns) / 1e3 }

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// roundKey names one round of one workload, across scenarios.
type roundKey struct {
	workload string
	round    int
}

// disturbance sorts out the rounds during which processes outside the
// bench used more than foreignLimit of the machine in some scenario's run
// of a workload: their tails measure waiting for a CPU. Such a round is
// left out of every scenario's figures for that workload (leftOut), as
// long as the workload keeps an undisturbed round; a workload whose every
// round was disturbed keeps them all and is busy, which makes the targets
// that read it inconclusive.
func disturbance(runs []RunRecord) (leftOut map[roundKey]bool, busy map[string]bool) {
	disturbed := map[roundKey]bool{}
	clean := map[string]bool{}
	for _, r := range runs {
		if r.ForeignCPU > foreignLimit {
			disturbed[roundKey{r.Workload, r.Round}] = true
		}
	}
	for _, r := range runs {
		if !disturbed[roundKey{r.Workload, r.Round}] {
			clean[r.Workload] = true
		}
	}
	leftOut, busy = map[roundKey]bool{}, map[string]bool{}
	for k := range disturbed {
		if clean[k.workload] {
			leftOut[k] = true
		} else {
			busy[k.workload] = true
		}
	}
	return leftOut, busy
}

// summarize aggregates runs per scenario and workload, in the order of
// scenarios and of workloads' first appearance.
func summarize(scenarios []Scenario, runs []RunRecord) ([]Summary, error) {
	type key struct{ s, w string }
	byKey := map[key][]RunRecord{}
	var workloads []string
	seenW := map[string]bool{}
	leftOut, busy := disturbance(runs)
	for _, r := range runs {
		byKey[key{r.Scenario, r.Workload}] = append(byKey[key{r.Scenario, r.Workload}], r)
		if !seenW[r.Workload] {
			seenW[r.Workload] = true
			workloads = append(workloads, r.Workload)
		}
	}
	var out []Summary
	idx := map[key]int{}
	for _, sc := range scenarios {
		for _, w := range workloads {
			rs := byKey[key{sc.Name, w}]
			if len(rs) == 0 {
				continue
			}
			s := Summary{Scenario: sc.Name, Workload: w, Busy: busy[w]}
			var p50, p90, p99, p999, rps, bps, lag, cpu []float64
			for _, r := range rs {
				if leftOut[roundKey{r.Workload, r.Round}] {
					s.Disturbed++
					continue
				}
				if r.Result == nil {
					s.Failed++
					continue
				}
				s.Rounds++
				s.Errors += r.Result.Errors
				rps = append(rps, r.Result.RPS)
				bps = append(bps, r.Result.BytesPerSec)
				h, err := hist.FromSnapshot(r.Result.Latency)
				if err != nil {
					return nil, fmt.Errorf("%s/%s round %d: %w", sc.Name, w, r.Round, err)
				}
				if h.Count() > 0 {
					p50 = append(p50, us(h.Quantile(0.5)))
					p90 = append(p90, us(h.Quantile(0.9)))
					p99 = append(p99, us(h.Quantile(0.99)))
					p999 = append(p999, us(h.Quantile(0.999)))
				}
				if lh, err := hist.FromSnapshot(r.Result.SendLag); err == nil && lh.Count() > 0 {
					lag = append(lag, us(lh.Quantile(0.99)))
				}
				var c int64
				var hwm int64
				for _, p := range r.Proxies {
					c += p.CPUNanos
					hwm += p.HWM
				}
				if len(r.Proxies) > 0 {
					s.Proxies = len(r.Proxies)
					s.ProxyPeakRSS = max(s.ProxyPeakRSS, hwm)
					if per, ok := cpuPer1000(c, r.Result); ok {
						cpu = append(cpu, per)
					}
				}
			}
			s.P50, s.P90, s.P99, s.P999 = median(p50), median(p90), median(p99), median(p999)
			if len(p99) > 0 {
				s.P99Min, s.P99Max = math.Inf(1), math.Inf(-1)
				for _, v := range p99 {
					s.P99Min, s.P99Max = min(s.P99Min, v), max(s.P99Max, v)
				}
			}
			s.RPS, s.BytesPerSec, s.GeneratorLagP99, s.ProxyCPUPer1000 = median(rps), median(bps), median(lag), median(cpu)
			idx[key{sc.Name, w}] = len(out)
			out = append(out, s)
		}
	}
	for _, sc := range scenarios {
		if sc.Baseline == "" {
			continue
		}
		for _, w := range workloads {
			i, ok := idx[key{sc.Name, w}]
			j, okb := idx[key{sc.Baseline, w}]
			if !ok || !okb || out[j].P99 == 0 || out[i].P99 == 0 {
				continue
			}
			out[i].AddedP50 = out[i].P50 - out[j].P50
			out[i].AddedP99 = out[i].P99 - out[j].P99
			out[i].RatioP99 = out[i].P99 / out[j].P99
		}
	}
	return out, nil
}

// find returns the summary of a scenario and workload.
func find(sum []Summary, scenario, workload string) (Summary, bool) {
	for _, s := range sum {
		if s.Scenario == scenario && s.Workload == workload {
			return s, true
		}
	}
	return Summary{}, false
}

func scenarioByName(scs []Scenario, name string) (Scenario, bool) {
	for _, s := range scs {
		if s.Name == name {
			return s, true
		}
	}
	return Scenario{}, false
}

// ReadResults reads a run's results.json.
func ReadResults(path string) (*Results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading results: %w", err)
	}
	var res Results
	if err := json.Unmarshal(b, &res); err != nil {
		return nil, fmt.Errorf("%s is not a bench results.json: %w", path, err)
	}
	if len(res.Runs) == 0 || len(res.Scenario) == 0 {
		return nil, fmt.Errorf("%s holds no runs or scenarios: is it a bench results.json?", path)
	}
	return &res, nil
}

// Rejudge recomputes the summary and the targets of recorded results with
// this version's rules (nodemeshctl bench --rejudge).
func Rejudge(res *Results) error {
	sum, err := summarize(res.Scenario, res.Runs)
	if err != nil {
		return err
	}
	res.Summary = sum
	res.Targets = judgeTargets(res)
	return nil
}

// judgeTargets reports the issue's targets as ratios of this run.
func judgeTargets(r *Results) []Target {
	headline := httpWorkload(r.Profile.HTTPRate, 16)
	var out []Target

	// 1. nodemesh L4 p99 added at 1000 rps.
	t := Target{Issue: 8, Name: "L4 latency", Goal: "nodemesh L4 adds at most 100 µs p99 over no mesh at 1000 rps, 1 kB HTTP/1.1 (" + headline + ")"}
	if sc, _ := scenarioByName(r.Scenario, scenarioMeshCross); sc.NotAvailable != "" {
		t.Status, t.Measured = "not available", sc.NotAvailable
	} else if s, ok := find(r.Summary, scenarioMeshCross, headline); ok && s.Rounds > 0 {
		t.Measured = fmt.Sprintf("%+.0f µs p99 (%.2fx of no mesh; p50 %+.0f µs)", s.AddedP99, s.RatioP99, s.AddedP50)
		t.Status = passMiss(s.AddedP99 <= 100)
		if s.AddedP99 > 100 {
			t.Note = fmt.Sprintf("missed by %.0f µs", s.AddedP99-100)
		}
		if why := unjudgeable(r, s); why != "" {
			t.Status, t.Note = "inconclusive", joinNote(why, t.Note)
		}
	} else {
		t.Status, t.Measured = "not available", "no successful run"
	}
	if s, ok := find(r.Summary, scenarioHAProxy, headline); ok && s.Rounds > 0 {
		t.Note = joinNote(t.Note, fmt.Sprintf("HAProxy mTLS sidecars in the same run: +%.0f µs p99 (%.2fx)", s.AddedP99, s.RatioP99))
	}
	if s, ok := find(r.Summary, scenarioMeshSide, headline); ok && s.Rounds > 0 {
		t.Note = joinNote(t.Note, fmt.Sprintf("nodemesh per-pod sidecars in the same run: +%.0f µs p99 (%.2fx)", s.AddedP99, s.RatioP99))
	}
	out = append(out, t)

	// 2. Agent memory under 1/10 of sidecars' at 50 pods per node.
	t = Target{Issue: 8, Name: "memory at 50 pods per node", Goal: "agent memory < 1/10 of the sidecars' total with 50 pods per node"}
	var side, agent *ScalePoint
	for i := range r.Scaling {
		p := &r.Scaling[i]
		if p.PodsPerNode != 50 {
			continue
		}
		switch p.Scenario {
		case scenarioHAProxy:
			side = p
		case scenarioMeshCross:
			agent = p
		}
	}
	switch {
	case agent == nil || agent.NotAvailable != "":
		t.Status = "not available"
		t.Measured = "nodemesh agent did not run"
		if agent != nil {
			t.Measured = agent.NotAvailable
		}
		if side != nil && side.Error == "" && side.NotAvailable == "" {
			t.Note = fmt.Sprintf("sidecars at 50 pods: %d proxies, %.1f MiB RSS in total", side.Proxies, float64(side.RSS)/(1<<20))
		} else if side == nil {
			t.Note = "this profile has no 50-pod point (use --profile full)"
		}
	case side == nil || side.Error != "" || agent.Error != "":
		t.Status, t.Measured = "not available", "no 50-pod measurement of both"
	default:
		ratio := float64(agent.RSS) / float64(side.RSS)
		t.Measured = fmt.Sprintf("agent %.1f MiB vs sidecars %.1f MiB: %.3f", float64(agent.RSS)/(1<<20), float64(side.RSS)/(1<<20), ratio)
		t.Status = passMiss(ratio < 0.1)
		if ratio >= 0.1 {
			t.Note = fmt.Sprintf("missed by %.1fx", ratio/0.1)
		}
	}
	out = append(out, t)

	// 3. Tunnel throughput >= half of single-core AES-GCM.
	t = Target{Issue: 8, Name: "tunnel throughput", Goal: "single-stream tunnel throughput at least 1/2 of single-core AES-128-GCM"}
	aes := r.Machine.AESGCMBytesPerCPUSecond
	if sc, _ := scenarioByName(r.Scenario, scenarioMeshCross); sc.NotAvailable != "" {
		t.Status, t.Measured = "not available", sc.NotAvailable
	} else if s, ok := find(r.Summary, scenarioMeshCross, workloadBulk); ok && s.Rounds > 0 && aes > 0 {
		f := s.BytesPerSec / aes
		t.Measured = fmt.Sprintf("%.0f MB/s = %.2f of AES-GCM %.0f MB/s", s.BytesPerSec/1e6, f, aes/1e6)
		t.Status = passMiss(f >= 0.5)
		if f < 0.5 {
			t.Note = fmt.Sprintf("missed by %.0f MB/s", (0.5*aes-s.BytesPerSec)/1e6)
			// Contention only lowers throughput: a pass stands, a miss on
			// an oversubscribed machine does not.
			if why := busyWhy(r, s); why != "" {
				t.Status, t.Note = "inconclusive", joinNote(why, t.Note)
			}
		}
	} else {
		t.Status, t.Measured = "not available", "no successful bulk run"
	}
	if s, ok := find(r.Summary, scenarioHAProxy, workloadBulk); ok && s.Rounds > 0 && aes > 0 {
		t.Note = joinNote(t.Note, fmt.Sprintf("HAProxy mTLS sidecars: %.0f MB/s = %.2f of AES-GCM", s.BytesPerSec/1e6, s.BytesPerSec/aes))
	}
	out = append(out, t)
	return append(out, judgeAgainstSidecars(r)...)
}

// pair compares a nodemesh scenario with a sidecar scenario of the same
// run, for one issue's targets.
type pair struct {
	r          *Results
	issue      int
	mesh, side string // scenario names
	// meshName and sideName name them in the measured figures; meshRun
	// and sideRun in "no successful ... run".
	meshName, sideName string
	meshRun, sideRun   string
	out                []Target
}

// compare judges one figure: better is true when nodemesh's value is at
// least as good as the sidecars'; latency comparisons need repeated
// rounds, every comparison a machine that was not oversubscribed.
func (p *pair) compare(name, goal, workload string, latency bool, judge func(mesh, side Summary) (measured string, better bool, note string)) {
	r := p.r
	t := Target{Issue: p.issue, Name: name, Goal: goal}
	mesh, okm := find(r.Summary, p.mesh, workload)
	side, oks := find(r.Summary, p.side, workload)
	switch {
	case !okm || mesh.Rounds == 0:
		t.Status, t.Measured = "not available", "no successful "+p.meshRun+" run"
		if sc, _ := scenarioByName(r.Scenario, p.mesh); sc.NotAvailable != "" {
			t.Measured = sc.NotAvailable
		}
	case !oks || side.Rounds == 0:
		t.Status, t.Measured = "not available", "no successful "+p.sideRun+" run to compare with"
		if sc, _ := scenarioByName(r.Scenario, p.side); sc.NotAvailable != "" {
			t.Measured = p.sideRun + ": " + sc.NotAvailable
		}
	default:
		var better bool
		t.Measured, better, t.Note = judge(mesh, side)
		t.Status = passMiss(better)
		why := ""
		if latency {
			why = joinNote(unjudgeable(r, mesh), unjudgeable(r, side))
		} else {
			why = joinNote(busyWhy(r, mesh), busyWhy(r, side))
		}
		if why != "" {
			t.Status, t.Note = "inconclusive", joinNote(why, t.Note)
		}
	}
	p.out = append(p.out, t)
}

// cpu judges proxy CPU per 1000 requests.
func (p *pair) cpu(mesh, side Summary) (string, bool, string) {
	if mesh.ProxyCPUPer1000 <= 0 || side.ProxyCPUPer1000 <= 0 {
		return "no CPU figure", false, "the proxies' CPU was not measured"
	}
	return fmt.Sprintf("%s %.3f s, %s %.3f s per 1000 (%.2fx)", p.meshName, mesh.ProxyCPUPer1000, p.sideName, side.ProxyCPUPer1000, mesh.ProxyCPUPer1000/side.ProxyCPUPer1000),
		mesh.ProxyCPUPer1000 <= side.ProxyCPUPer1000, ""
}

// latency judges added p50 and p99; the note says when they are half of
// the sidecars' (issue 12's stretch goal).
func (p *pair) latency(mesh, side Summary) (string, bool, string) {
	m := fmt.Sprintf("added p50 / p99: %s %+.0f / %+.0f µs, %s %+.0f / %+.0f µs", p.meshName, mesh.AddedP50, mesh.AddedP99, p.sideName, side.AddedP50, side.AddedP99)
	note := ""
	if mesh.AddedP50 <= side.AddedP50/2 && mesh.AddedP99 <= side.AddedP99/2 {
		note = "half of the sidecars' added latency: reached"
	}
	return m, mesh.AddedP50 <= side.AddedP50 && mesh.AddedP99 <= side.AddedP99, note
}

// judgeAgainstSidecars states issue 12's targets: nodemesh L4 across nodes
// against the HAProxy mTLS sidecars of the same run; and issue 15's:
// nodemesh L7 against the HAProxy HTTP-mode sidecars.
func judgeAgainstSidecars(r *Results) []Target {
	p := &pair{r: r, issue: 12, mesh: scenarioMeshCross, side: scenarioHAProxy, meshName: "nodemesh", sideName: "sidecars",
		meshRun: "nodemesh L4", sideRun: "HAProxy sidecar"}
	headline := httpWorkload(r.Profile.HTTPRate, 16)
	p.compare("proxy CPU, "+headline, "nodemesh L4's proxy CPU per 1000 requests at or below the sidecars'", headline, false, p.cpu)
	p.compare("proxy CPU, "+workloadRR, "nodemesh L4's proxy CPU per 1000 transactions at or below the sidecars'", workloadRR, false, p.cpu)
	for _, c := range r.Profile.HTTPConns {
		w := httpWorkload(r.Profile.HTTPRate, c)
		p.compare("added latency, "+w, "nodemesh L4's added p50 and p99 (over no mesh) at or below the sidecars'; beyond that, half of theirs", w, true, p.latency)
	}
	rate := func(unit string) func(mesh, side Summary) (string, bool, string) {
		return func(mesh, side Summary) (string, bool, string) {
			return fmt.Sprintf("nodemesh %.0f, sidecars %.0f %s (%.2fx)", mesh.RPS, side.RPS, unit, mesh.RPS/side.RPS), mesh.RPS >= side.RPS, ""
		}
	}
	p.compare(workloadRR+" rate", "nodemesh L4's transactions/s at or above the sidecars'", workloadRR, false, rate("transactions/s"))
	p.compare(workloadBulk+" throughput", "nodemesh L4's single-stream throughput at or above the sidecars'", workloadBulk, false, func(mesh, side Summary) (string, bool, string) {
		return fmt.Sprintf("nodemesh %.0f MB/s, sidecars %.0f MB/s (%.2fx)", mesh.BytesPerSec/1e6, side.BytesPerSec/1e6, mesh.BytesPerSec/side.BytesPerSec), mesh.BytesPerSec >= side.BytesPerSec, ""
	})
	p.compare(workloadCRR+" lead", "nodemesh L4 keeps its lead in connections/s over the sidecars", workloadCRR, false, rate("connections/s"))

	// Issue 15: L7 against L7, both parsing every request.
	l7p := &pair{r: r, issue: 15, mesh: scenarioL7, side: scenarioHAProxyL7, meshName: "nodemesh L7", sideName: "HTTP sidecars",
		meshRun: "nodemesh L7", sideRun: "HAProxy HTTP-mode sidecar"}
	l7p.compare("L7 proxy CPU, "+headline, "nodemesh L7's proxy CPU per 1000 requests at or below the HAProxy HTTP-mode sidecar pair's", headline, false, l7p.cpu)
	for _, c := range r.Profile.HTTPConns {
		w := httpWorkload(r.Profile.HTTPRate, c)
		l7p.compare("L7 added latency, "+w, "nodemesh L7's added p50 and p99 (over no mesh) at or below the HAProxy HTTP-mode sidecar pair's", w, true, l7p.latency)
	}
	return append(p.out, l7p.out...)
}

// unjudgeable says why a latency figure cannot judge a target: fewer than
// three rounds (disturbed ones left out), or a busy machine.
func unjudgeable(r *Results, s Summary) string {
	var why []string
	if s.Rounds < 3 {
		w := fmt.Sprintf("only %d round(s) of %s: p99 differences need repeats (use --profile full)", s.Rounds, s.Scenario)
		if s.Disturbed > 0 {
			w = fmt.Sprintf("only %d round(s) of %s left after %d were disturbed by processes outside the bench: p99 differences need 3; repeat on an idle machine", s.Rounds, s.Scenario, s.Disturbed)
		}
		why = append(why, w)
	}
	if b := busyWhy(r, s); b != "" {
		why = append(why, b)
	}
	return strings.Join(why, "; ")
}

// busyWhy says why s was measured on a machine too busy to judge: every
// round of its workload disturbed by other processes, or, where those were
// not measured, the load averages.
func busyWhy(r *Results, s Summary) string {
	if s.Busy {
		return fmt.Sprintf("every round of %s was disturbed by processes outside the bench (over %.0f%% of the CPU); repeat on an idle machine", s.Workload, 100*foreignLimit)
	}
	if oversubscribed(r.Machine) {
		return busyNote(r.Machine)
	}
	return ""
}

// oversubscribed says whether the whole run was too busy to judge
// comparisons. That is decided by the load averages at the start and end
// only when other processes' CPU was not measured for every run: when it
// was, summarize leaves out the rounds they disturbed, and each target
// judges the rounds it has left.
func oversubscribed(m Machine) bool {
	if m.ForeignMeasured {
		return false
	}
	return loadAbove(m.LoadStart, m.CPUs) || loadAbove(m.LoadEnd, m.CPUs)
}

// busyNote says why oversubscribed holds.
func busyNote(m Machine) string {
	return fmt.Sprintf("machine oversubscribed (load %s, %s on %d CPUs)", m.LoadStart, m.LoadEnd, m.CPUs)
}

func passMiss(ok bool) string {
	if ok {
		return "pass"
	}
	return "miss"
}

func joinNote(a, b string) string {
	switch {
	case a == "" || a == b:
		return b
	case b == "":
		return a
	}
	return a + "; " + b
}

// cpuPer1000 is the proxies' CPU seconds per 1000 requests of the
// measured window: their CPU rate over the window (cpu ns in WatchWall)
// divided by the window's request rate.
func cpuPer1000(cpu int64, r *load.Result) (float64, bool) {
	if r.Requests == 0 || r.WatchWall <= 0 || r.Elapsed <= 0 {
		return 0, false
	}
	rate := float64(cpu) / 1e9 / r.WatchWall.Seconds()
	return rate / (float64(r.Requests) / r.Elapsed.Seconds()) * 1000, true
}
