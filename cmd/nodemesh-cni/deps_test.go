package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPluginStaysSmall: the runtime starts the plugin for every pod
// sandbox, so it links nothing of Kubernetes, eBPF or TLS: the standard
// library, x/sys and the protocol of agent/cni only.
func TestPluginStaysSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, d := range strings.Fields(string(out)) {
		switch {
		case d == "github.com/nodemesh/nodemesh/cmd/nodemesh-cni", d == "github.com/nodemesh/nodemesh/agent/cni",
			strings.HasPrefix(d, "golang.org/x/sys/"):
		default:
			t.Errorf("nodemesh-cni links %s", d)
		}
	}
}
