package workloads

import (
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/agent/state"
)

type fakeScanner struct {
	found map[string]nodeinfo.Sandbox
	err   error
	calls int
}

func (f *fakeScanner) Scan() (map[string]nodeinfo.Sandbox, map[string]error, error) {
	f.calls++
	return f.found, map[string]error{"ambiguous": nodeinfo.ErrAmbiguousNetns}, f.err
}

func TestLocatePodNetns(t *testing.T) {
	ip := []netip.Addr{netip.MustParseAddr("10.244.1.5")}
	annotated := state.WithDetail(state.Pod{Enrolled: true, Phase: state.PodRunning, IPs: ip}, state.PodDetail{UID: "u1", Netns: "/run/netns/nm-x", Cgroup: "/sys/fs/cgroup/nm-x"})
	bare := state.WithDetail(state.Pod{Enrolled: true, Phase: state.PodRunning, IPs: ip}, state.PodDetail{UID: "u2"})
	notEnrolled := state.WithDetail(state.Pod{Phase: state.PodRunning, IPs: ip}, state.PodDetail{UID: "u3"})
	noIP := state.WithDetail(state.Pod{Enrolled: true, Phase: state.PodPending}, state.PodDetail{UID: "u2"})
	found := map[string]nodeinfo.Sandbox{
		"u1": {UID: "u1", Netns: "/proc/10/ns/net", Cgroup: "/sys/fs/cgroup/kubepods/pod-u1"},
		"u2": {UID: "u2", Netns: "/proc/20/ns/net", Cgroup: "/sys/fs/cgroup/kubepods/pod-u2"},
	}
	for _, tc := range []struct {
		name       string
		mode       string
		pod        *state.Pod
		wantNetns  string
		wantCgroup string
		wantScan   bool
	}{
		{"auto trusts lab annotations", NetnsAuto, annotated, "/run/netns/nm-x", "/sys/fs/cgroup/nm-x", false},
		{"auto falls back to proc", NetnsAuto, bare, "/proc/20/ns/net", "/sys/fs/cgroup/kubepods/pod-u2", true},
		{"proc ignores annotations", NetnsProc, annotated, "/proc/10/ns/net", "/sys/fs/cgroup/kubepods/pod-u1", true},
		{"proc finds bare pod", NetnsProc, bare, "/proc/20/ns/net", "/sys/fs/cgroup/kubepods/pod-u2", true},
		{"not enrolled is left alone", NetnsProc, notEnrolled, "", "", false},
		{"no IP yet is left alone", NetnsProc, noIP, "", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := &fakeScanner{found: found}
			l := NewLocator(tc.mode, fs, nil)
			before := *tc.pod
			got := l.Locate([]*state.Pod{tc.pod})[0]
			if got.Netns() != tc.wantNetns || got.Cgroup() != tc.wantCgroup {
				t.Errorf("located (%q, %q), want (%q, %q)", got.Netns(), got.Cgroup(), tc.wantNetns, tc.wantCgroup)
			}
			if (fs.calls > 0) != tc.wantScan {
				t.Errorf("scanned /proc %d times, want scan=%v", fs.calls, tc.wantScan)
			}
			if tc.pod.Netns() != before.Netns() || tc.pod.Cgroup() != before.Cgroup() {
				t.Errorf("locate modified the snapshot's pod")
			}
		})
	}

	t.Run("pod not found stays unlocated, and a failing scan never guesses", func(t *testing.T) {
		for _, fs := range []*fakeScanner{{found: map[string]nodeinfo.Sandbox{}}, {err: errors.New("permission denied")}} {
			l := NewLocator(NetnsProc, fs, nil)
			if got := l.Locate([]*state.Pod{annotated})[0]; got.Netns() != "" || (Filter{}).Wanted(got) {
				t.Errorf("pod located at %q (wanted=%v) without a sandbox", got.Netns(), (Filter{}).Wanted(got))
			}
		}
	})

	t.Run("one scan per reconcile", func(t *testing.T) {
		fs := &fakeScanner{found: found}
		l := NewLocator(NetnsProc, fs, nil)
		l.Locate([]*state.Pod{annotated, bare})
		if fs.calls != 1 {
			t.Errorf("scanned %d times for two pods, want 1", fs.calls)
		}
	})

	t.Run("later reconciles reuse a live sandbox and rescan a gone one", func(t *testing.T) {
		fs := &fakeScanner{found: found}
		live := map[string]bool{"u2": true}
		l := NewLocator(NetnsProc, fs, nil)
		l.alive = func(sb nodeinfo.Sandbox) bool { return live[sb.UID] }
		l.Locate([]*state.Pod{bare})
		if got := l.Locate([]*state.Pod{bare})[0]; got.Netns() != "/proc/20/ns/net" || fs.calls != 1 {
			t.Errorf("second reconcile: netns %q after %d scans, want the cached sandbox and 1 scan", got.Netns(), fs.calls)
		}
		live["u2"] = false // the sandbox process exited: its pid may be reused
		fs.found = map[string]nodeinfo.Sandbox{"u2": {UID: "u2", Netns: "/proc/30/ns/net"}}
		if got := l.Locate([]*state.Pod{bare})[0]; got.Netns() != "/proc/30/ns/net" || fs.calls != 2 {
			t.Errorf("after the sandbox went: netns %q after %d scans, want a rescan", got.Netns(), fs.calls)
		}
		l.Locate(nil)
		if len(l.located) != 0 {
			t.Errorf("Locate kept %d cached sandboxes of pods gone from the node", len(l.located))
		}
	})

	t.Run("annotations mode never scans", func(t *testing.T) {
		fs := &fakeScanner{found: found}
		l := NewLocator(NetnsAnnotations, fs, nil)
		if got := l.Locate([]*state.Pod{bare})[0]; got.Netns() != "" || fs.calls != 0 {
			t.Errorf("located %q after %d scans in annotations mode", got.Netns(), fs.calls)
		}
	})
}

func TestStillThere(t *testing.T) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		t.Skipf("no /proc/self/ns/net: %v", err)
	}
	if !stillThere(nodeinfo.Sandbox{Netns: "/proc/self/ns/net", NetnsInode: st.Ino}) {
		t.Error("a live namespace with its own inode is not there")
	}
	if stillThere(nodeinfo.Sandbox{Netns: "/proc/self/ns/net", NetnsInode: st.Ino + 1}) {
		t.Error("a different namespace behind the same path (recycled pid) counts as there")
	}
	if stillThere(nodeinfo.Sandbox{Netns: "/proc/999999999/ns/net", NetnsInode: st.Ino}) {
		t.Error("a gone process counts as there")
	}
}
