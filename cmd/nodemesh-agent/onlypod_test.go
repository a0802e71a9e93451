package main

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/state"
)

func TestOnlyPod(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/mesh/sa/web")
	pod := func(ns, name string) *state.Pod {
		return &state.Pod{Namespace: ns, Name: name, Enrolled: true, Netns: "/run/netns/x", Identity: id,
			IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Phase: state.PodRunning}
	}
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
	node := &dataplane{a: &agent{cfg: cfg()}}
	one := &dataplane{a: &agent{cfg: cfg("--only-pod=mesh/web-0", "--only-pod", "mesh/web-1")}}
	if !node.wanted(pod("mesh", "web-0")) || !node.wanted(pod("mesh", "other")) {
		t.Fatal("the node agent (no --only-pod) must serve every enrolled pod of its node")
	}
	for _, tt := range []struct {
		ns, name string
		want     bool
	}{
		{"mesh", "web-0", true}, {"mesh", "web-1", true}, {"mesh", "web-2", false}, {"other", "web-0", false}, {"mesh", "web", false},
	} {
		if got := one.wanted(pod(tt.ns, tt.name)); got != tt.want {
			t.Errorf("--only-pod mesh/web-0,mesh/web-1 serving %s/%s: %v, want %v", tt.ns, tt.name, got, tt.want)
		}
	}
	// The filter narrows, never widens: an unenrolled pod stays unserved.
	p := pod("mesh", "web-0")
	p.Enrolled = false
	if one.wanted(p) {
		t.Error("an unenrolled pod was served because --only-pod names it")
	}
	if !one.a.cfg.perPod() || node.a.cfg.perPod() {
		t.Error("perPod")
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
