package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// methodNotes states how the numbers were made; the report repeats them.
func methodNotes() []string {
	return []string{
		"Every scenario runs every workload once per round; rounds repeat the whole sequence, and within a round the scenarios take turns per workload, so drift of the machine hits all alike. Figures are medians over rounds; the p99 spread is min-max over rounds.",
		"HTTP: open loop at a fixed total rate over persistent HTTP/1.1 connections, 1 kB request and response bodies, each connection on its own uniform timetable (phase-shifted), no catch-up bursts.",
		"Coordinated omission: each connection is replayed on a virtual timeline where the generator is perfect; a request is charged its measured service time (response read minus actually written) plus any time it would have queued behind earlier slow responses on its connection. The generator's own timer overshoot (Go sleeps wake ~1 ms late) is therefore not charged; it is reported separately as generator lag.",
		"tcp-rr: closed loop, 1 byte each way on one connection (like netperf TCP_RR). tcp-crr: a new connection per 1-byte exchange (like TCP_CRR), latency includes connect; every benchmark pod runs with net.ipv4.tcp_tw_reuse=1 so TIME_WAIT does not exhaust its ports. bulk: one stream written in 128 kB chunks, throughput counted from bytes the server confirms after a half-close.",
		"Proxy CPU: on-CPU time of every proxy process summed over its threads from /proc/<pid>/task/*/schedstat, read at the edges of each run's measured window by the load generator, per 1000 requests (transactions) of that window. Memory: VmRSS and VmHWM from /proc/<pid>/status.",
		"Machine limits in the same run: loopback inside one pod without any proxy, and single-core AES-128-GCM sealing of 16 kB records with Go's crypto per CPU second of the measuring thread.",
		"Sidecars: HAProxy 1 thread per pod, TCP mode, TLS 1.3, ECDSA P-256 SVIDs with spiffe:// URI SANs from a bench CA; the client app dials its sidecar on loopback (no capture rules), the server sidecar forwards to the app on loopback. HAProxy verifies the chain, not the exact SPIFFE ID.",
		"Scenario (e), HTTP workloads only: nodemesh L7 is the L4 scenario's client calling the ClusterIP of a Service labelled nodemesh.io/l7=enabled, whose only pod is a server of its own on node-2 (so no pod of the L4 scenarios is handled at L7); both agents parse every request with net/http, the client's routes it and picks the endpoint per request, the server's authorises it. The L7 sidecar baseline is the same HAProxy pair through a second pair of listeners in HTTP mode (keep-alive, connection reuse to the next hop), mTLS between them as in (d).",
	}
}

// WriteOutput writes report.md, results.json and the SVG charts to dir.
func WriteOutput(dir string, res *Results) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating the results directory: %w", err)
	}
	js, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding results: %w", err)
	}
	files := map[string][]byte{"results.json": append(js, '\n')}
	charts := charts(res)
	for name, svg := range charts {
		files[name] = svg
	}
	files["report.md"] = []byte(markdown(res, charts))
	for name, b := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return fmt.Errorf("writing %s: %w", p, err)
		}
	}
	return nil
}

// ranScenarios are the scenarios with at least one summary.
func ranScenarios(res *Results) []Scenario {
	var out []Scenario
	for _, sc := range res.Scenario {
		for _, s := range res.Summary {
			if s.Scenario == sc.Name && s.Rounds > 0 {
				out = append(out, sc)
				break
			}
		}
	}
	return out
}

func workloads(res *Results) []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range res.Summary {
		if !seen[s.Workload] {
			seen[s.Workload] = true
			out = append(out, s.Workload)
		}
	}
	return out
}

func chartName(workload string) string { return "latency-" + workload + ".svg" }

func charts(res *Results) map[string][]byte {
	out := map[string][]byte{}
	for _, w := range workloads(res) {
		if w == workloadBulk {
			continue
		}
		var ss []series
		for _, sc := range ranScenarios(res) {
			s, ok := find(res.Summary, sc.Name, w)
			if !ok || s.Rounds == 0 {
				continue
			}
			ss = append(ss, series{Name: sc.Name, Values: []float64{s.P50, s.P90, s.P99, s.P999}})
		}
		out[chartName(w)] = lineChart("Latency percentiles, "+w+" (median of rounds)", "latency (µs, log scale)", []string{"p50", "p90", "p99", "p99.9"}, ss, true)
	}
	var xs []string
	var pods []int
	for _, p := range res.Profile.PodsPerNode {
		xs = append(xs, fmt.Sprint(p))
		pods = append(pods, p)
	}
	mem := map[string][]float64{}
	cpu := map[string][]float64{}
	var order []string
	for _, p := range res.Scaling {
		if _, ok := mem[p.Scenario]; !ok {
			order = append(order, p.Scenario)
			mem[p.Scenario] = nanSlice(len(pods))
			cpu[p.Scenario] = nanSlice(len(pods))
		}
		for i, n := range pods {
			if n == p.PodsPerNode && p.NotAvailable == "" && p.Error == "" {
				mem[p.Scenario][i] = float64(p.RSS) / (1 << 20)
				cpu[p.Scenario][i] = p.CPUPer1000
			}
		}
	}
	var ms, cs []series
	for _, s := range order {
		ms = append(ms, series{Name: s, Values: mem[s]})
		cs = append(cs, series{Name: s, Values: cpu[s]})
	}
	out["cost-memory.svg"] = lineChart("Proxy memory on the server node vs pods per node", "RSS of all proxies (MiB)", xs, ms, false)
	out["cost-cpu.svg"] = lineChart("Proxy CPU vs pods per node (1000 rps over all pods)", "CPU s per 1000 requests", xs, cs, false)
	return out
}

func nanSlice(n int) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = math.NaN()
	}
	return s
}

func markdown(res *Results, charts map[string][]byte) string {
	var b bytes.Buffer
	p := res.Profile
	fmt.Fprintf(&b, "# nodemesh benchmark (%s profile)\n\n", p.Name)
	fmt.Fprintf(&b, "Started %s, took %s. %d round(s), each workload %s after %s warm-up. Machine: %d CPUs, kernel %s, %s.\n\n",
		res.Started.Format(time.RFC3339), res.Elapsed.Round(time.Second), p.Rounds, p.Duration, p.Warmup, res.Machine.CPUs, res.Machine.Kernel, res.Machine.GoVersion)
	fmt.Fprintf(&b, "Machine load (1/5/15 min averages) at start %s, at end %s; CPU pressure at start: %s.\n", res.Machine.LoadStart, res.Machine.LoadEnd, orNA(res.Machine.PressureStart))
	if res.Machine.ForeignMeasured {
		fmt.Fprintf(&b, "Processes outside the bench (its lab's cgroups and nodemeshctl) used at most %.1f%% of the machine's CPU during any measured run (limit %.0f%%).\n", 100*res.Machine.ForeignCPU, 100*foreignLimit)
	}
	leftOut, busy := disturbance(res.Runs)
	if d := roundList(res.Runs, leftOut); d != "" {
		fmt.Fprintf(&b, "Rounds during which they used more are left out of every scenario's figures for that workload, so comparisons stay paired: %s.\n", d)
	}
	if len(busy) > 0 {
		ws := slices.Sorted(maps.Keys(busy))
		fmt.Fprintf(&b, "**Every round of %s was disturbed: those figures are kept, but they measure waiting for a CPU, and the targets that read them are inconclusive. Repeat on an idle machine.**\n", strings.Join(ws, ", "))
	}
	if oversubscribed(res.Machine) {
		fmt.Fprintf(&b, "**%s: tails (p99, p99.9) mostly measure waiting for a CPU, not the data path. Read medians and ratios, and repeat on an idle machine.**\n", upperFirst(busyNote(res.Machine)))
	}
	b.WriteString("\n")
	b.WriteString("Compare scenarios only within this run: ratios and differences are meaningful, absolute times depend on the machine and its load. See bench/README.md for the methodology.\n\n")

	b.WriteString("## Targets\n\nIssue 8 set the first three; issue 12 compares nodemesh L4 across nodes with the HAProxy mTLS sidecars of this run; issue 15 compares nodemesh L7 (a Service opted in to L7) with the same sidecars' HTTP-mode listeners.\n\n| issue | target | goal | measured | status | note |\n|---|---|---|---|---|---|\n")
	for _, t := range res.Targets {
		fmt.Fprintf(&b, "| %d | %s | %s | %s | **%s** | %s |\n", t.Issue, t.Name, esc(t.Goal), esc(t.Measured), t.Status, esc(t.Note))
	}

	b.WriteString("\n## Scenarios\n\n| scenario | what | status |\n|---|---|---|\n")
	for _, sc := range res.Scenario {
		st := "ran"
		if sc.NotAvailable != "" {
			st = "not available: " + sc.NotAvailable
		} else {
			if _, ok := findAny(res.Summary, sc.Name); !ok {
				st = "no successful run (see results.json)"
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", sc.Name, esc(sc.Title), esc(st))
	}

	fmt.Fprintf(&b, "\n## Machine limits\n\n- Single-core AES-128-GCM (Go crypto, 16 kB records): **%.0f MB/s** per CPU second.\n", res.Machine.AESGCMBytesPerCPUSecond/1e6)
	if s, ok := find(res.Summary, scenarioLoopback, workloadRR); ok && s.Rounds > 0 {
		fmt.Fprintf(&b, "- Loopback round trip without any proxy (tcp-rr inside one pod): p50 %.1f µs, p99 %.1f µs, %.0f transactions/s.\n", s.P50, s.P99, s.RPS)
	}
	if s, ok := find(res.Summary, scenarioLoopback, workloadBulk); ok && s.Rounds > 0 {
		fmt.Fprintf(&b, "- Loopback single stream without any proxy: %.0f MB/s.\n", s.BytesPerSec/1e6)
	}

	for _, w := range workloads(res) {
		fmt.Fprintf(&b, "\n## %s\n\n", w)
		if w == workloadBulk {
			b.WriteString("| scenario | rounds | throughput MB/s | vs baseline | fraction of AES-GCM core | proxy CPU s/GB | proxies peak RSS MiB |\n|---|---|---|---|---|---|---|\n")
		} else {
			b.WriteString("| scenario | rounds | p50 µs | p90 µs | p99 µs (min–max) | p99.9 µs | added p99 µs | p99 ratio | req/s | proxy CPU s/1000 req | proxies peak RSS MiB | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		}
		for _, sc := range res.Scenario {
			s, ok := find(res.Summary, sc.Name, w)
			if !ok {
				continue
			}
			rounds := fmt.Sprint(s.Rounds)
			if s.Failed > 0 {
				rounds += fmt.Sprintf(" (+%d failed)", s.Failed)
			}
			if s.Disturbed > 0 {
				rounds += fmt.Sprintf(" (+%d disturbed, left out)", s.Disturbed)
			}
			if s.Busy {
				rounds += " (all disturbed)"
			}
			if s.Rounds == 0 {
				fmt.Fprintf(&b, "| %s | %s | failed: %s |\n", sc.Name, rounds, esc(firstRunError(res, sc.Name, w)))
				continue
			}
			if w == workloadBulk {
				vs, frac, cpu := "", "", ""
				if base, ok := find(res.Summary, sc.Baseline, w); ok && base.BytesPerSec > 0 {
					vs = fmt.Sprintf("%.2fx", s.BytesPerSec/base.BytesPerSec)
				}
				if a := res.Machine.AESGCMBytesPerCPUSecond; a > 0 {
					frac = fmt.Sprintf("%.2f", s.BytesPerSec/a)
				}
				if s.Proxies > 0 {
					cpu = fmt.Sprintf("%.3f", proxyCPUPerGB(res, sc.Name, w))
				}
				fmt.Fprintf(&b, "| %s | %s | %.0f | %s | %s | %s | %s |\n", sc.Name, rounds, s.BytesPerSec/1e6, vs, frac, cpu, mib(s.ProxyPeakRSS, s.Proxies))
				continue
			}
			added, ratio, cpu := "", "", ""
			if s.RatioP99 > 0 {
				added, ratio = fmt.Sprintf("%+.0f", s.AddedP99), fmt.Sprintf("%.2fx", s.RatioP99)
			}
			if s.Proxies > 0 {
				cpu = fmt.Sprintf("%.4f", s.ProxyCPUPer1000)
			}
			fmt.Fprintf(&b, "| %s | %s | %.0f | %.0f | %.0f (%.0f–%.0f) | %.0f | %s | %s | %.0f | %s | %s | %d |\n",
				sc.Name, rounds, s.P50, s.P90, s.P99, s.P99Min, s.P99Max, s.P999, added, ratio, s.RPS, cpu, mib(s.ProxyPeakRSS, s.Proxies), s.Errors)
		}
		if _, ok := charts[chartName(w)]; ok {
			fmt.Fprintf(&b, "\n![latency percentiles, %s](%s)\n", w, chartName(w))
		}
		if strings.HasPrefix(w, "http-") {
			if s, ok := find(res.Summary, scenarioNoMesh, w); ok && s.Rounds > 0 {
				fmt.Fprintf(&b, "\nLoad generator lag (its own timer overshoot, not charged), p99 in the no-mesh run: %.0f µs.\n", s.GeneratorLagP99)
			}
		}
	}

	b.WriteString("\n## Cost vs pods per node\n\nEach point: that many server pods on the server node (node-2; node-4 for nodemesh sidecars) and 1000 requests/s spread over all of them (max(16, pods) connections). Sidecars (HAProxy, or nodemesh agents with --only-pod) add one proxy per pod; the nodemesh node agent stays one per node.\n\n| scenario | pods per node | proxies on the server node | RSS MiB (sum) | peak RSS MiB (sum) | CPU s/1000 req (all proxies) | p99 µs | status |\n|---|---|---|---|---|---|---|---|\n")
	for _, pt := range res.Scaling {
		st := "ok"
		switch {
		case pt.NotAvailable != "":
			st = "not available: " + pt.NotAvailable
		case pt.Error != "":
			st = "failed: " + pt.Error
		}
		if pt.NotAvailable != "" {
			fmt.Fprintf(&b, "| %s | %d | | | | | | %s |\n", pt.Scenario, pt.PodsPerNode, esc(st))
			continue
		}
		fmt.Fprintf(&b, "| %s | %d | %d | %.1f | %.1f | %.4f | %.0f | %s |\n", pt.Scenario, pt.PodsPerNode, pt.Proxies, float64(pt.RSS)/(1<<20), float64(pt.HWM)/(1<<20), pt.CPUPer1000, pt.P99, esc(st))
	}
	b.WriteString("\n![proxy memory vs pods per node](cost-memory.svg)\n\n![proxy CPU vs pods per node](cost-cpu.svg)\n")

	if len(res.Profiles) > 0 {
		b.WriteString("\n## Agent CPU profiles and traces\n\nTaken during round 1 of the nodemesh runs (cross-node), in profiles/: read the CPU profiles (`.pprof`) with `go tool pprof -top <file>` and the execution traces (`.trace`) with `go tool trace <file>`.\n\n")
		for _, f := range res.Profiles {
			fmt.Fprintf(&b, "- [%s](profiles/%s)\n", f, f)
		}
	}
	b.WriteString("\n## Method\n\n")
	for _, m := range res.Method {
		fmt.Fprintf(&b, "- %s\n", m)
	}
	b.WriteString("\nRaw data, including every run's histogram, is in results.json.\n")
	return b.String()
}

// roundList names the rounds in d, per workload in the order the runs
// came: "http-1000rps-1c rounds 1, 2; bulk round 1".
func roundList(runs []RunRecord, d map[roundKey]bool) string {
	var order []string
	rounds := map[string][]int{}
	for _, r := range runs {
		k := roundKey{r.Workload, r.Round}
		if !d[k] {
			continue
		}
		if _, ok := rounds[r.Workload]; !ok {
			order = append(order, r.Workload)
		}
		if !slices.Contains(rounds[r.Workload], r.Round) {
			rounds[r.Workload] = append(rounds[r.Workload], r.Round)
		}
	}
	var parts []string
	for _, w := range order {
		rs := rounds[w]
		slices.Sort(rs)
		word := "round"
		if len(rs) > 1 {
			word = "rounds"
		}
		nums := make([]string, len(rs))
		for i, n := range rs {
			nums[i] = strconv.Itoa(n)
		}
		parts = append(parts, fmt.Sprintf("%s %s %s", w, word, strings.Join(nums, ", ")))
	}
	return strings.Join(parts, "; ")
}

func orNA(s string) string {
	if s == "" {
		return "n/a"
	}
	return s
}

// loadAbove reports whether the 1-minute load average exceeds cpus.
func loadAbove(load string, cpus int) bool {
	f := strings.Fields(load)
	if len(f) == 0 || cpus <= 0 {
		return false
	}
	v, err := strconv.ParseFloat(f[0], 64)
	return err == nil && v > float64(cpus)
}

func findAny(sum []Summary, scenario string) (Summary, bool) {
	for _, s := range sum {
		if s.Scenario == scenario && s.Rounds > 0 {
			return s, true
		}
	}
	return Summary{}, false
}

func firstRunError(res *Results, scenario, workload string) string {
	for _, r := range res.Runs {
		if r.Scenario == scenario && r.Workload == workload && r.Error != "" {
			return truncate(r.Error, 200)
		}
	}
	return "unknown"
}

// proxyCPUPerGB is the median over rounds of proxy CPU seconds per GB
// carried in a bulk run, disturbed rounds left out as in summarize.
func proxyCPUPerGB(res *Results, scenario, workload string) float64 {
	var v []float64
	leftOut, _ := disturbance(res.Runs)
	for _, r := range res.Runs {
		if r.Scenario != scenario || r.Workload != workload || r.Result == nil || r.Result.BytesPerSec <= 0 || leftOut[roundKey{r.Workload, r.Round}] {
			continue
		}
		var c int64
		for _, p := range r.Proxies {
			c += p.CPUNanos
		}
		if r.Result.WatchWall > 0 {
			// CPU rate over the window against the byte rate.
			v = append(v, float64(c)/1e9/r.Result.WatchWall.Seconds()/(r.Result.BytesPerSec/1e9))
		}
	}
	return median(v)
}

func mib(b int64, procs int) string {
	if procs == 0 {
		return ""
	}
	return fmt.Sprintf("%.1f", float64(b)/(1<<20))
}

func esc(s string) string {
	s = strings.ReplaceAll(s, "|", "\\|")
	return strings.ReplaceAll(s, "\n", " ")
}
