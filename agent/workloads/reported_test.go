package workloads

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/agent/state"
)

type fakeFile struct{ closed int }

func (f *fakeFile) Close() error { f.closed++; return nil }

func TestLocateReportedSandbox(t *testing.T) {
	ip := netip.MustParseAddr("10.244.1.5")
	r := NewReported(30 * time.Second)
	f := &fakeFile{}
	rep := r.Put(Report{UID: "u2", Namespace: "shop", Name: "web-0", ContainerID: "c1", IPs: []netip.Addr{ip}}, f, 42)
	if rep.Netns != "/proc/self/fd/42" {
		t.Fatalf("reported netns %q", rep.Netns)
	}
	fs := &fakeScanner{found: map[string]nodeinfo.Sandbox{"u2": {UID: "u2", Netns: "/proc/20/ns/net"}}}
	l := NewLocator(NetnsProc, fs, nil)
	l.UseReported(r)
	// Kubelet has not written the pod's IP yet (Pending, no IPs), and no
	// process of the pod exists: the report places it all the same.
	pending := state.WithDetail(state.Pod{Namespace: "shop", Name: "web-0", Enrolled: true, Phase: state.PodPending}, state.PodDetail{UID: "u2"})
	got := l.Locate([]*state.Pod{pending})[0]
	if got.Netns() != "/proc/self/fd/42" || got.Cgroup() != "" || !slices.Equal(got.IPs, []netip.Addr{ip}) || fs.calls != 0 {
		t.Fatalf("located %+v (scans %d)", got, fs.calls)
	}
	if len(pending.IPs) != 0 || pending.Netns() != "" {
		t.Fatal("Locate changed the snapshot's pod")
	}
	// Once the API has the IPs, they are the API's; the path stays the
	// reported one, so the plan does not re-enroll the pod.
	running := state.WithDetail(state.Pod{Namespace: "shop", Name: "web-0", Enrolled: true, Phase: state.PodRunning, IPs: []netip.Addr{ip}}, state.PodDetail{UID: "u2"})
	if got := l.Locate([]*state.Pod{running})[0]; got.Netns() != "/proc/self/fd/42" || fs.calls != 0 {
		t.Fatalf("located %+v", got)
	}
	// Not enrolled: left alone.
	plain := state.WithDetail(state.Pod{Phase: state.PodRunning}, state.PodDetail{UID: "u2"})
	if got := l.Locate([]*state.Pod{plain})[0]; got.Netns() != "" {
		t.Fatalf("unenrolled pod located at %q", got.Netns())
	}
	if f.closed != 0 {
		t.Fatal("descriptor closed while the report is in use")
	}
}

func TestReportedLifecycle(t *testing.T) {
	now := time.Unix(1000, 0)
	r := NewReported(30 * time.Second)
	r.now = func() time.Time { return now }
	f1, f2, f3 := &fakeFile{}, &fakeFile{}, &fakeFile{}
	r.Put(Report{UID: "u1", ContainerID: "c1"}, f1, 10)
	// A new sandbox of the same pod replaces the old report.
	r.Put(Report{UID: "u1", ContainerID: "c2"}, f2, 11)
	if got, _ := r.Get("u1"); got.ContainerID != "c2" || r.Len() != 1 {
		t.Fatalf("report %+v, %d held", got, r.Len())
	}
	// DEL of the old sandbox leaves the new one.
	r.Forget("u1", "c1")
	if _, ok := r.Get("u1"); !ok {
		t.Fatal("DEL of an older sandbox dropped the current report")
	}
	r.Forget("", "c2")
	if _, ok := r.Get("u1"); ok {
		t.Fatal("DEL by container ID did not drop the report")
	}
	// Dropped descriptors stay open for closeDelay (a draining pod may
	// still dial into its namespace), then close.
	if f1.closed+f2.closed != 0 {
		t.Fatal("closed at once")
	}
	now = now.Add(closeDelay)
	r.Put(Report{UID: "u3", ContainerID: "c3"}, f3, 12)
	if f1.closed != 1 || f2.closed != 1 || f3.closed != 0 {
		t.Fatalf("closed %d %d %d after the delay", f1.closed, f2.closed, f3.closed)
	}
	// A pod missing from the state is dropped only after keepGrace.
	r.Keep(map[string]bool{})
	if _, ok := r.Get("u3"); !ok {
		t.Fatal("a fresh report dropped by an older snapshot")
	}
	now = now.Add(keepGrace)
	r.Keep(map[string]bool{})
	if _, ok := r.Get("u3"); ok {
		t.Fatal("the report of a pod gone from the state was kept")
	}
	r.Close()
	if f3.closed != 1 {
		t.Fatalf("Close left a descriptor open (%d)", f3.closed)
	}
	var nilR *Reported
	if _, ok := nilR.Get("u1"); ok {
		t.Fatal("nil table has reports")
	}
	nilR.Keep(nil)
}
