package workloads

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/state"
)

func TestFilter(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/mesh/sa/web")
	pod := func(ns, name string) *state.Pod {
		return state.WithDetail(state.Pod{Namespace: ns, Name: name, Enrolled: true, Identity: id,
			IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Phase: state.PodRunning}, state.PodDetail{Netns: "/run/netns/x"})
	}
	node := Filter{Node: "n1"}
	one := Filter{Node: "n1", Only: map[string]bool{"mesh/web-0": true, "mesh/web-1": true}}
	if !node.Wanted(pod("mesh", "web-0")) || !node.Wanted(pod("mesh", "other")) {
		t.Fatal("the node agent (no --only-pod) must serve every enrolled pod of its node")
	}
	for _, tt := range []struct {
		ns, name string
		want     bool
	}{
		{"mesh", "web-0", true}, {"mesh", "web-1", true}, {"mesh", "web-2", false}, {"other", "web-0", false}, {"mesh", "web", false},
	} {
		if got := one.Wanted(pod(tt.ns, tt.name)); got != tt.want {
			t.Errorf("--only-pod mesh/web-0,mesh/web-1 serving %s/%s: %v, want %v", tt.ns, tt.name, got, tt.want)
		}
	}
	// The filter narrows, never widens.
	for name, change := range map[string]func(*state.Pod){
		"unenrolled":      func(p *state.Pod) { p.Enrolled = false },
		"not located yet": func(p *state.Pod) { p.SetLocation("", p.Cgroup()) },
		"no IP":           func(p *state.Pod) { p.IPs = nil },
		"no identity":     func(p *state.Pod) { p.Identity = spiffeid.ID{} },
		"finished":        func(p *state.Pod) { p.Phase = state.PodSucceeded },
	} {
		p := pod("mesh", "web-0")
		change(p)
		if one.Wanted(p) || node.Wanted(p) {
			t.Errorf("a pod %s was wanted", name)
		}
	}
}

func TestPlan(t *testing.T) {
	ip := func(s string) []netip.Addr { return []netip.Addr{netip.MustParseAddr(s)} }
	pod := func(name, uid, netns, addr string, exclude ...uint16) *state.Pod {
		return state.WithDetail(state.Pod{Namespace: "ns", Name: name, IPs: ip(addr)}, state.PodDetail{UID: uid, Netns: netns, ExcludeOutboundPorts: exclude})
	}
	a := pod("a", "ua", "/n/a", "10.0.0.1")
	b := pod("b", "ub", "/n/b", "10.0.0.2")
	served := func(p *state.Pod, captured, failed bool, excluded ...uint16) Served {
		return Served{Pod: p, Captured: captured, Failed: failed, Excluded: excluded}
	}
	for _, tc := range []struct {
		name   string
		served map[state.Key]Served
		want   []*state.Pod
		plan   string
	}{
		{"nothing", nil, nil, "[]"},
		{"new pods in key order", nil, []*state.Pod{b, a}, "[enroll ns/a enroll ns/b]"},
		{"steady", map[state.Key]Served{a.Key(): served(a, true, false)}, []*state.Pod{a}, "[]"},
		{"pod gone", map[state.Key]Served{a.Key(): served(a, true, false), b.Key(): served(b, true, false)}, []*state.Pod{b}, "[unenroll ns/a]"},
		{"recreated with a new UID", map[state.Key]Served{a.Key(): served(a, true, false)}, []*state.Pod{pod("a", "ua2", "/n/a", "10.0.0.1")}, "[unenroll ns/a enroll ns/a]"},
		{"new sandbox", map[state.Key]Served{a.Key(): served(a, true, false)}, []*state.Pod{pod("a", "ua", "/n/a2", "10.0.0.1")}, "[unenroll ns/a enroll ns/a]"},
		{"new IP", map[state.Key]Served{a.Key(): served(a, true, false)}, []*state.Pod{pod("a", "ua", "/n/a", "10.0.0.9")}, "[unenroll ns/a enroll ns/a]"},
		{"enrollment failed: retry", map[state.Key]Served{a.Key(): served(a, false, true)}, []*state.Pod{a}, "[retry ns/a]"},
		{"self-check failed: recheck, stay captured", map[state.Key]Served{a.Key(): served(a, true, true)}, []*state.Pod{a}, "[recheck ns/a]"},
		{"excluded ports changed", map[state.Key]Served{a.Key(): served(a, true, false)}, []*state.Pod{pod("a", "ua", "/n/a", "10.0.0.1", 5432)}, "[update-excluded ns/a]"},
		{"unenrolls come first", map[state.Key]Served{b.Key(): served(b, true, false)}, []*state.Pod{a}, "[unenroll ns/b enroll ns/a]"},
	} {
		var got []string
		for _, act := range Plan(tc.served, tc.want) {
			got = append(got, act.Kind.String()+" "+act.Key.String())
			if (act.Kind == Unenroll) != (act.Pod == nil) {
				t.Errorf("%s: %s with pod %v", tc.name, act.Kind, act.Pod)
			}
		}
		if s := fmt.Sprint(got); s != tc.plan {
			t.Errorf("%s: plan %s, want %s", tc.name, s, tc.plan)
		}
	}
}

func TestWantedIPs(t *testing.T) {
	got := WantedIPs([]*state.Pod{{IPs: []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("fd00::1")}}})
	if !got[netip.MustParseAddr("10.0.0.1")] || !got[netip.MustParseAddr("fd00::1")] || len(got) != 2 {
		t.Errorf("WantedIPs = %v", got)
	}
}
