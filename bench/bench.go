// Package bench is nodemesh's benchmark harness: it brings up a lab
// (four nodes, client and server pods), runs every scenario - no mesh, the
// sidecar baselines, nodemesh - over the same workloads in interleaved
// rounds so that drift of the machine hits all of them alike, samples the
// CPU time and memory of every proxy process, and writes a report
// (report.md), the raw data (results.json) and SVG charts.
//
// The load generator and the servers (package bench/load) run inside the
// pods as this very binary, reached through a symlink named WorkerName;
// see WorkerMain. Methodology and how to read the numbers: bench/README.md.
package bench

import (
	"fmt"
	"time"
)

// Profile sizes a benchmark run.
type Profile struct {
	Name string `json:"name"`
	// Rounds is how often every scenario runs every workload; the report
	// gives the median over rounds and the min-max spread.
	Rounds int `json:"rounds"`
	// Warmup and Duration of each workload run.
	Warmup   time.Duration `json:"warmup"`
	Duration time.Duration `json:"duration"`
	// HTTPRate (requests/s) is offered over each of HTTPConns connections.
	HTTPRate  float64 `json:"httpRate"`
	HTTPConns []int   `json:"httpConns"`
	// Size is the HTTP request and response body size.
	Size int `json:"size"`
	// PodsPerNode are the scale points of the cost measurement.
	PodsPerNode []int `json:"podsPerNode"`
}

// Profiles by name.
var Profiles = map[string]Profile{
	"quick": {
		Name: "quick", Rounds: 1, Warmup: 500 * time.Millisecond, Duration: 2 * time.Second,
		HTTPRate: 1000, HTTPConns: []int{1, 16, 64}, Size: 1024, PodsPerNode: []int{1, 10},
	},
	"full": {
		Name: "full", Rounds: 5, Warmup: 2 * time.Second, Duration: 10 * time.Second,
		HTTPRate: 1000, HTTPConns: []int{1, 16, 64}, Size: 1024, PodsPerNode: []int{1, 10, 50},
	},
}

// ProfileByName returns a profile or an error naming the choices.
func ProfileByName(name string) (Profile, error) {
	p, ok := Profiles[name]
	if !ok {
		return Profile{}, fmt.Errorf("unknown profile %q: use quick or full", name)
	}
	return p, nil
}
