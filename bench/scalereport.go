package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nodemesh/nodemesh/agent/rollout"
)

// WriteScaleOutput writes report.md, results.json and the charts of a
// scale run to dir.
func WriteScaleOutput(dir string, res *ScaleResults) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating the results directory: %w", err)
	}
	js, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding results: %w", err)
	}
	files := map[string][]byte{"results.json": append(js, '\n')}
	for name, svg := range scaleCharts(res) {
		files[name] = svg
	}
	files["report.md"] = []byte(scaleMarkdown(res))
	for name, b := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return fmt.Errorf("writing %s: %w", p, err)
		}
	}
	return nil
}

const (
	chartScaleMemory  = "scale-memory.svg"
	chartScaleCPU     = "scale-cpu.svg"
	chartScaleLatency = "scale-enforcement.svg"
)

func scaleCharts(res *ScaleResults) map[string][]byte {
	if len(res.Points) == 0 {
		return nil
	}
	var xs []string
	for _, p := range res.Points {
		xs = append(xs, fmt.Sprint(p.Pods))
	}
	val := func(f func(p ScaleSize) float64) []float64 {
		var out []float64
		for _, p := range res.Points {
			if p.Error != "" {
				out = append(out, math.NaN())
				continue
			}
			out = append(out, f(p))
		}
		return out
	}
	mib := func(b int64) float64 {
		if b < 0 {
			return math.NaN()
		}
		return float64(b) / (1 << 20)
	}
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	return map[string][]byte{
		chartScaleMemory: lineChart("agent memory vs synthetic pods", "MiB", xs, []series{
			{Name: "RSS at rest", Values: val(func(p ScaleSize) float64 { return mib(p.Rest.RSS) })},
			{Name: "heap at rest", Values: val(func(p ScaleSize) float64 { return mib(p.Rest.HeapInuse) })},
			{Name: "live heap at rest", Values: val(func(p ScaleSize) float64 { return mib(p.LiveHeap) })},
			{Name: "RSS under churn", Values: val(func(p ScaleSize) float64 { return mib(p.Churn.RSS) })},
		}, false),
		chartScaleCPU: lineChart("agent CPU vs synthetic pods", "cores", xs, []series{
			{Name: "at rest", Values: val(func(p ScaleSize) float64 { return p.Rest.CPU })},
			{Name: "under churn", Values: val(func(p ScaleSize) float64 { return p.Churn.CPU })},
		}, false),
		chartScaleLatency: lineChart("change to enforcement p99 vs synthetic pods", "ms", xs, []series{
			{Name: "NetworkPolicy, rest", Values: val(func(p ScaleSize) float64 { return ms(p.Rest.Netpol.P99) })},
			{Name: "pod label, rest", Values: val(func(p ScaleSize) float64 { return ms(p.Rest.Label.P99) })},
			{Name: "NetworkPolicy, churn", Values: val(func(p ScaleSize) float64 { return ms(p.Churn.Netpol.P99) })},
			{Name: "pod label, churn", Values: val(func(p ScaleSize) float64 { return ms(p.Churn.Label.P99) })},
		}, true),
	}
}

func fmtBytes(b int64) string {
	if b < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%d µs", d.Microseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%.0f ms", float64(d)/1e6)
	}
	return d.Round(100 * time.Millisecond).String()
}

func scaleMarkdown(res *ScaleResults) string {
	var b strings.Builder
	p := res.Profile
	fmt.Fprintf(&b, "# nodemesh scale benchmark (%s)\n\n", p.Name)
	fmt.Fprintf(&b, "Started %s, finished %s; %d CPUs; load averages before the run: %s.\n\n",
		res.Started.Format(time.RFC3339), res.Finished.Format(time.RFC3339), res.CPUs, res.LoadBefore)
	b.WriteString("One real nodemesh agent (data plane on, its own client and server pods enrolled) against the lab's real kube-apiserver and etcd, " +
		"loaded with a synthetic cluster (per 100 pods: 5 nodes, 1 namespace, 10 NetworkPolicies, 1 AuthorizationPolicy, 5 Services with EndpointSlices). " +
		"The API server, etcd, the loader and the agent share the machine: figures include that contention. Method: bench/README.md, \"Scale profile\".\n\n")
	for _, n := range res.Notes {
		fmt.Fprintf(&b, "- note: %s\n", n)
	}
	b.WriteString("\n## Loading the API server\n\n| pods | nodes | namespaces | netpols | authz | services | objects added | API writes | took | load avg after |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, pt := range res.Points {
		s := pt.Shape
		fmt.Fprintf(&b, "| %d | %d | %d | %d | %d | %d | %d | %d | %s | %s |\n", pt.Pods, s.Nodes, s.Namespaces, s.NetworkPolicies,
			s.AuthorizationPolicies, s.Services, pt.Load.Objects, pt.Load.Requests, fmtDur(pt.Load.Total), pt.LoadAvg)
	}
	b.WriteString("\n## The agent\n\n| pods | condition | RSS | heap in use | CPU (cores) | changes/s | CPU ms/change | API req/min | watch KiB/min | NetworkPolicy→enforced p50 / p99 | label→enforced p50 / p99 | tcp-crr p50 / p99 | load avg |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, pt := range res.Points {
		for _, c := range []struct {
			name string
			c    ScaleCond
		}{{"rest", pt.Rest}, {"churn", pt.Churn}, {"marks", pt.Marks}} {
			cc := c.c
			if cc.Window == 0 {
				continue
			}
			perMin := 60 / cc.Window.Seconds()
			rate, per := "-", "-"
			if c.name != "rest" {
				rate = fmt.Sprintf("%.0f", cc.ChangesPerSec)
				per = fmt.Sprintf("%.2f", cc.CPUPerChange)
			}
			crr := fmtDur(cc.CRR.P50) + " / " + fmtDur(cc.CRR.P99)
			if cc.CRRError != "" {
				crr += " (" + truncate(cc.CRRError, 60) + ")"
			}
			np := fmtDur(cc.Netpol.P50) + " / " + fmtDur(cc.Netpol.P99)
			if cc.Netpol.Timeouts > 0 {
				np += fmt.Sprintf(" (%d timeouts)", cc.Netpol.Timeouts)
			}
			fmt.Fprintf(&b, "| %d | %s | %s | %s | %.3f | %s | %s | %.0f | %.0f | %s | %s | %s | %s |\n",
				pt.Pods, c.name, fmtBytes(cc.RSS), fmtBytes(cc.HeapInuse), cc.CPU, rate, per,
				float64(cc.API.Requests())*perMin, float64(cc.API.WatchBytes)/1024*perMin,
				np, fmtDur(cc.Label.P50)+" / "+fmtDur(cc.Label.P99), crr, cc.LoadAvg)
		}
	}
	b.WriteString(marksMarkdown(res))
	b.WriteString(liveHeapMarkdown(res))
	b.WriteString("\n## Start-up and restart at size\n\n| pods | agent caught up after load | restart to ready (and last pod known) | restart API requests | restart bytes |\n|---|---|---|---|---|\n")
	for _, pt := range res.Points {
		fmt.Fprintf(&b, "| %d | %s | %s | %d | %s |\n", pt.Pods, fmtDur(pt.CatchUp), fmtDur(pt.Restart), pt.RestartAPI.Requests(), fmtBytes(pt.RestartAPI.Bytes))
	}
	for _, pt := range res.Points {
		if pt.Error != "" {
			fmt.Fprintf(&b, "\n**%d pods failed:** %s\n", pt.Pods, pt.Error)
		}
	}
	if len(res.Profiles) > 0 {
		b.WriteString("\nProfiles of the agent: CPU over each churn window (`*-churn.pprof`, `go tool pprof -top FILE`; the profiler's own cost is in the churn figures) and " +
			"live heap before loading and at rest at each point (`*-heap.pprof`, `go tool pprof -sample_index=inuse_space -top FILE`): ")
		for i, f := range res.Profiles {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "profiles/%s", f)
		}
		b.WriteString(".\n")
	}
	fmt.Fprintf(&b, "\n![memory](%s)\n![cpu](%s)\n![enforcement](%s)\n", chartScaleMemory, chartScaleCPU, chartScaleLatency)
	b.WriteString("\nSamples per cell: change→enforcement has 2×" + fmt.Sprint(p.Probes) +
		" samples per kind and condition, so its p99 is the largest but one or the largest; each is timed from just before the API call until the agent's " +
		"/policy/explain (answered from the snapshot the agent enforces) flips, polled every ~2 ms plus one admin round trip.\n")
	return b.String()
}

// liveHeapMarkdown is the report's per-pod memory: the agent's live heap
// (after a forced collection) at each point at rest, against the same
// agent before any synthetic object and against the point before.
func liveHeapMarkdown(res *ScaleResults) string {
	var b strings.Builder
	b.WriteString("\n## Memory per pod (live heap)\n\n")
	b.WriteString("RSS and heap in use include garbage the collector has not reclaimed yet, so they vary with when it last ran. " +
		"The live heap is the agent's Go heap right after a forced collection (`HeapAlloc` from `/debug/pprof/heap?gc=1`), at rest. " +
		"Per synthetic pod is (live heap at the point - live heap before loading) / pods: it includes each pod's share of the synthetic " +
		"cluster's other objects (per 100 pods: 5 nodes, 1 namespace, 10 NetworkPolicies, 1 AuthorizationPolicy, 5 Services with EndpointSlices), " +
		"and the agent's own growth with size (maps, caches). Between points is the same over the pods added since the point before.\n\n")
	fmt.Fprintf(&b, "Live heap before loading: %s.\n\n", fmtBytes(res.BaseLiveHeap))
	b.WriteString("| pods | live heap | minus before loading | per synthetic pod | per pod since the point before |\n|---|---|---|---|---|\n")
	prevPods, prevLive := 0, res.BaseLiveHeap
	for _, pt := range res.Points {
		if pt.LiveHeap <= 0 {
			fmt.Fprintf(&b, "| %d | n/a | | | |\n", pt.Pods)
			prevPods, prevLive = 0, -1
			continue
		}
		grown, perPod := "n/a", "n/a"
		if res.BaseLiveHeap > 0 {
			grown = fmtBytes(pt.LiveHeap - res.BaseLiveHeap)
			perPod = fmt.Sprintf("%.0f B", float64(pt.LiveHeap-res.BaseLiveHeap)/float64(pt.Pods))
		}
		since := "n/a"
		if prevLive > 0 && pt.Pods > prevPods {
			since = fmt.Sprintf("%.0f B", float64(pt.LiveHeap-prevLive)/float64(pt.Pods-prevPods))
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s |\n", pt.Pods, fmtBytes(pt.LiveHeap), grown, perPod, since)
		prevPods, prevLive = pt.Pods, pt.LiveHeap
	}
	return b.String()
}

// marksMarkdown is the report's node-mark section: the agent's share of
// the API traffic of a cluster whose every node renews its mark.
func marksMarkdown(res *ScaleResults) string {
	p := res.Profile
	if p.MarkNodes == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Node marks of %d nodes (simulated)\n\n", p.MarkNodes)
	fmt.Fprintf(&b, "In the marks condition the bench holds a mark (a Lease in %s, as an agent writes it) for each of %d simulated nodes and renews each every %s, "+
		"one Update per renewal, spread evenly: the renewals every agent of such a cluster watches. Rows \"marks\" above give the agent's CPU per renewal; "+
		"its API requests are its own (its mark and discovery), the watch bytes are mostly the other nodes' marks. "+
		"Where the API server could not take the asked rate, the last column scales the watch bytes to it.\n\n", rollout.DefaultNamespace, p.MarkNodes, p.MarkRenew)
	b.WriteString("| pods | renewals/s asked | achieved | late / failed | agent CPU (cores) | API req/min | watch KiB/min | watch KiB/min at the asked rate |\n|---|---|---|---|---|---|---|---|\n")
	for _, pt := range res.Points {
		c := pt.Marks
		if c.Window == 0 {
			continue
		}
		perMin := 60 / c.Window.Seconds()
		watch := float64(c.API.WatchBytes) / 1024 * perMin
		scaled := "n/a"
		if c.ChangesPerSec > 0 {
			scaled = fmt.Sprintf("%.0f", watch*pt.MarksAsked/c.ChangesPerSec)
		}
		fmt.Fprintf(&b, "| %d | %.0f | %.0f | %d / %d | %.3f | %.0f | %.0f | %s |\n", pt.Pods, pt.MarksAsked, c.ChangesPerSec,
			c.ChangesLate, c.ChangeErrors, c.CPU, float64(c.API.Requests())*perMin, watch, scaled)
	}
	return b.String()
}
