package main

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestAgentLinksOnlyTheAPIGroupsItUses keeps client-go's clientset, informer
// factory and discovery client out of the agent. Each of them registers
// every Kubernetes API group, which adds megabytes of code that every
// node's agent keeps resident (agent/k8s/apiclient, docs/scale.md). The
// agent reads core, discovery, networking and coordination, and nothing
// else.
func TestAgentLinksOnlyTheAPIGroupsItUses(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	forbidden := []string{
		"k8s.io/client-go/kubernetes",
		"k8s.io/client-go/informers",
		"k8s.io/client-go/listers",
		"k8s.io/client-go/discovery",
		"k8s.io/client-go/dynamic/dynamicinformer",
		"k8s.io/client-go/applyconfigurations",
	}
	allowedAPI := []string{
		"k8s.io/api/core/v1",
		"k8s.io/api/discovery/v1",
		"k8s.io/api/networking/v1",
		"k8s.io/api/coordination/v1",
	}
	for _, d := range deps {
		for _, f := range forbidden {
			if d == f || strings.HasPrefix(d, f+"/") {
				t.Errorf("the agent links %s; use agent/k8s/apiclient instead (why: %s)", d, whyImported(t, d))
			}
		}
		if strings.HasPrefix(d, "k8s.io/api/") && !slices.Contains(allowedAPI, d) {
			t.Errorf("the agent links API group %s, which it does not use (why: %s)", d, whyImported(t, d))
		}
	}
}

// whyImported names the shortest import chain from the module to pkg.
func whyImported(t *testing.T, pkg string) string {
	out, err := exec.Command("go", "mod", "why", "-m=false", pkg).CombinedOutput()
	if err != nil {
		return err.Error()
	}
	return strings.Join(strings.Fields(string(out)), " -> ")
}
