package node

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/workloads"
)

// TestPendingPodsBackoff: a pending pod is retried 200 ms after it turned
// pending, then at doubling intervals up to the cap; reconciles between
// due times (snapshot changes) do not move its schedule; its wait is
// logged once when it starts and once when it ends; a pod recreated under
// the same name starts over.
func TestPendingPodsBackoff(t *testing.T) {
	var buf bytes.Buffer
	r := newPendingPods(slog.New(slog.NewTextHandler(&buf, nil)))
	a, b := state.Key{Namespace: "ns", Name: "a"}, state.Key{Namespace: "ns", Name: "b"}
	t0 := time.Unix(1000, 0)
	pend := func(keys ...state.Key) map[state.Key]pendingReason {
		m := map[state.Key]pendingReason{}
		for _, k := range keys {
			m[k] = pendingReason{UID: "uid-" + k.Name, Reason: "network namespace not found yet"}
		}
		return m
	}
	if next := r.update(t0, nil); !next.IsZero() {
		t.Fatalf("nothing pending: next %v, want none", next)
	}
	now := t0
	if next := r.update(now, pend(a)); next != now.Add(200*time.Millisecond) {
		t.Fatalf("first retry at %v, want +200ms", next.Sub(t0))
	}
	// A snapshot change 50 ms later retries a too, but leaves its schedule.
	if next := r.update(now.Add(50*time.Millisecond), pend(a)); next != now.Add(200*time.Millisecond) {
		t.Fatalf("after an early reconcile: next at %v, want +200ms", next.Sub(t0))
	}
	// Retries at the due times: 400, 800, 1600, 3200, then the 5 s cap.
	var gaps []time.Duration
	next := now.Add(200 * time.Millisecond)
	for range 7 {
		now = next
		next = r.update(now, pend(a))
		gaps = append(gaps, next.Sub(now))
	}
	want := []time.Duration{400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond,
		3200 * time.Millisecond, 5 * time.Second, 5 * time.Second, 5 * time.Second}
	for i := range want {
		if gaps[i] != want[i] {
			t.Fatalf("intervals %v, want %v", gaps, want)
		}
	}
	// b turns pending: the next reconcile is b's first retry, 200 ms out.
	if got := r.update(now, pend(a, b)); got != now.Add(200*time.Millisecond) {
		t.Fatalf("with b new: next at +%v, want +200ms", got.Sub(now))
	}
	// a is captured: only b's schedule remains.
	now = now.Add(200 * time.Millisecond)
	if got := r.update(now, pend(b)); got != now.Add(400*time.Millisecond) {
		t.Fatalf("after a captured: next at +%v, want +400ms (b's second retry)", got.Sub(now))
	}
	// b recreated (another UID): it starts over at 200 ms.
	again := pend(b)
	again[b] = pendingReason{UID: "uid-b2", Reason: "capture failed"}
	if got := r.update(now.Add(time.Second), again); got != now.Add(time.Second+200*time.Millisecond) {
		t.Fatalf("b recreated: next at +%v, want +1.2s", got.Sub(now))
	}
	// A failure between reconciles: b (pending) keeps its schedule, a new
	// pod c is due 200 ms later.
	c := state.Key{Namespace: "ns", Name: "c"}
	if got := r.add(now.Add(1100*time.Millisecond), again); got != now.Add(time.Second+200*time.Millisecond) {
		t.Fatalf("add of pending b moved its retry to +%v", got.Sub(now))
	}
	if got := r.add(now.Add(1100*time.Millisecond), pend(c)); got != now.Add(time.Second+200*time.Millisecond) {
		t.Fatalf("add of c: next at +%v, want b's +1.2s", got.Sub(now))
	}
	both := pend(c)
	both[b] = again[b]
	if got := r.update(now.Add(1200*time.Millisecond), both); got != now.Add(1300*time.Millisecond) {
		t.Fatalf("after b's retry: next at +%v, want c's +1.3s", got.Sub(now))
	}
	if next := r.update(now.Add(2*time.Second), nil); !next.IsZero() {
		t.Fatalf("none pending: next %v", next)
	}
	logs := buf.String()
	for _, tc := range []struct {
		msg  string
		want int
	}{
		{"pod waiting for capture", 4},             // a, b, b recreated, c
		{"pod no longer waiting for capture\"", 3}, // a, c, then b2
	} {
		if n := strings.Count(logs, `msg="`+tc.msg); n != tc.want {
			t.Errorf("%d logs %q, want %d:\n%s", n, tc.msg, tc.want, logs)
		}
	}
}

// TestWaitsForNetns: only pods the node would capture but for their network
// namespace wait for it.
func TestWaitsForNetns(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/a")
	ip := []netip.Addr{netip.MustParseAddr("10.244.0.9")}
	f := workloads.Filter{Node: "n1"}
	base := *state.WithDetail(state.Pod{Namespace: "demo", Name: "a", Enrolled: true, Phase: state.PodRunning, IPs: ip, Identity: id}, state.PodDetail{UID: "u"})
	mod := func(f func(*state.Pod)) *state.Pod { p := base; f(&p); return &p }
	for _, tc := range []struct {
		name string
		pod  *state.Pod
		want bool
	}{
		{"running without netns", &base, true},
		{"netns found", mod(func(p *state.Pod) { p.SetLocation("/proc/1/ns/net", "") }), false},
		{"not enrolled", mod(func(p *state.Pod) { p.Enrolled = false }), false},
		{"no address yet", mod(func(p *state.Pod) { p.IPs = nil }), false},
		{"no identity", mod(func(p *state.Pod) { p.Identity = spiffeid.ID{} }), false},
		{"no UID", mod(func(p *state.Pod) { p.SetUID("") }), false},
		{"terminating", mod(func(p *state.Pod) { p.Terminating = true }), false},
	} {
		if got := waitsForNetns(f, tc.pod); got != tc.want {
			t.Errorf("%s: waitsForNetns = %v, want %v", tc.name, got, tc.want)
		}
	}
	only := workloads.Filter{Node: "n1", Only: map[string]bool{"demo/other": true}}
	if waitsForNetns(only, &base) {
		t.Error("a pod outside --only-pods waits for its network namespace")
	}
}
