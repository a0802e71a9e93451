// Package version is the build version of the nodemesh binaries
// (nodemesh-agent, nodemesh-ca, nodemeshctl). `make build` stamps it with
//
//	-ldflags "-X github.com/nodemesh/nodemesh/agent/version.version=v0.1.0"
//
// (VERSION in the Makefile: the git tag, or the commit when untagged). An
// unstamped build (go build, go test) reports the module version Go
// recorded, else "devel" with the VCS revision when Go recorded one.
package version

import (
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// version is set at link time; keep it a plain string variable so -X works.
var version = ""

// Info describes one build.
type Info struct {
	Version   string `json:"version"`
	GoVersion string `json:"goVersion"`
	Revision  string `json:"revision,omitempty"`
	Platform  string `json:"platform"`
}

// Get returns this binary's build information.
func Get() Info {
	i := Info{Version: version, GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	bi, ok := debug.ReadBuildInfo()
	if ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				i.Revision = s.Value
			}
		}
	}
	if i.Version == "" {
		i.Version = "devel"
		if ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			i.Version = bi.Main.Version
		}
	}
	return i
}

// String returns the version alone ("v0.1.0", "devel").
func String() string { return Get().Version }

// Collector returns the gauge nodemesh_build_info{component, version,
// revision, goversion} = 1, the usual Prometheus "info" metric: join on it
// to label other series with the version, or count versions across nodes
// during an upgrade.
func Collector(component string) prometheus.Collector {
	i := Get()
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "nodemesh_build_info",
		Help: "Build of this nodemesh binary (always 1): component, version, VCS revision and Go version.",
		ConstLabels: prometheus.Labels{"component": component, "version": i.Version, "revision": i.Revision,
			"goversion": i.GoVersion},
	})
	g.Set(1)
	return g
}
