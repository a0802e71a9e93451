package main

import (
	"maps"
	"strings"
	"testing"
)

func TestOnlyPod(t *testing.T) {
	cfg := func(args ...string) *Config {
		c, err := parseConfig(append([]string{"--node-name=n1"}, args...), env(nil))
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Validate(); err != nil {
			t.Fatal(err)
		}
		return c
	}
	node := cfg()
	one := cfg("--only-pod=mesh/web-0", "--only-pod", "mesh/web-1")
	if got := node.nodeConfig(nil, nil, nil, nil).OnlyPods; len(got) != 0 {
		t.Fatalf("the node agent (no --only-pod) restricts to %v", got)
	}
	// The filter itself is agent/workloads.Filter (tested there); here,
	// that the flags reach it.
	want := map[string]bool{"mesh/web-0": true, "mesh/web-1": true}
	if got := one.nodeConfig(nil, nil, nil, nil).OnlyPods; !maps.Equal(got, want) {
		t.Fatalf("--only-pod mesh/web-0 --only-pod mesh/web-1: OnlyPods %v, want %v", got, want)
	}
	// Per-pod mode needs the data plane.
	c, err := parseConfig([]string{"--node-name=n1", "--dataplane=false", "--only-pod=mesh/web-0"}, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--dataplane") {
		t.Errorf("--only-pod with --dataplane=false: %v", err)
	}
}
