package main

import (
	"errors"
	"io"
	"log/slog"
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
	annotated := &state.Pod{UID: "u1", Enrolled: true, Phase: state.PodRunning, IPs: ip, Netns: "/run/netns/nm-x", Cgroup: "/sys/fs/cgroup/nm-x"}
	bare := &state.Pod{UID: "u2", Enrolled: true, Phase: state.PodRunning, IPs: ip}
	notEnrolled := &state.Pod{UID: "u3", Phase: state.PodRunning, IPs: ip}
	noIP := &state.Pod{UID: "u2", Enrolled: true, Phase: state.PodPending}
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
		{"auto trusts lab annotations", podNetnsAuto, annotated, "/run/netns/nm-x", "/sys/fs/cgroup/nm-x", false},
		{"auto falls back to proc", podNetnsAuto, bare, "/proc/20/ns/net", "/sys/fs/cgroup/kubepods/pod-u2", true},
		{"proc ignores annotations", podNetnsProc, annotated, "/proc/10/ns/net", "/sys/fs/cgroup/kubepods/pod-u1", true},
		{"proc finds bare pod", podNetnsProc, bare, "/proc/20/ns/net", "/sys/fs/cgroup/kubepods/pod-u2", true},
		{"not enrolled is left alone", podNetnsProc, notEnrolled, "", "", false},
		{"no IP yet is left alone", podNetnsProc, noIP, "", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := &fakeScanner{found: found}
			dp := &dataplane{log: slog.New(slog.NewTextHandler(io.Discard, nil)), podNetns: tc.mode, sandboxes: fs}
			before := *tc.pod
			got := dp.locate(tc.pod, dp.scanOnce())
			if got.Netns != tc.wantNetns || got.Cgroup != tc.wantCgroup {
				t.Errorf("located (%q, %q), want (%q, %q)", got.Netns, got.Cgroup, tc.wantNetns, tc.wantCgroup)
			}
			if (fs.calls > 0) != tc.wantScan {
				t.Errorf("scanned /proc %d times, want scan=%v", fs.calls, tc.wantScan)
			}
			if tc.pod.Netns != before.Netns || tc.pod.Cgroup != before.Cgroup {
				t.Errorf("locate modified the snapshot's pod")
			}
		})
	}

	t.Run("pod not found stays unlocated, and a failing scan never guesses", func(t *testing.T) {
		for _, fs := range []*fakeScanner{{found: map[string]nodeinfo.Sandbox{}}, {err: errors.New("permission denied")}} {
			dp := &dataplane{log: slog.New(slog.NewTextHandler(io.Discard, nil)), podNetns: podNetnsProc, sandboxes: fs}
			if got := dp.locate(annotated, dp.scanOnce()); got.Netns != "" || dp.wanted(got) {
				t.Errorf("pod located at %q (wanted=%v) without a sandbox", got.Netns, dp.wanted(got))
			}
		}
	})

	t.Run("one scan per reconcile", func(t *testing.T) {
		fs := &fakeScanner{found: found}
		dp := &dataplane{log: slog.New(slog.NewTextHandler(io.Discard, nil)), podNetns: podNetnsProc, sandboxes: fs}
		scan := dp.scanOnce()
		dp.locate(annotated, scan)
		dp.locate(bare, scan)
		if fs.calls != 1 {
			t.Errorf("scanned %d times for two pods, want 1", fs.calls)
		}
	})

	t.Run("later reconciles reuse a live sandbox and rescan a gone one", func(t *testing.T) {
		fs := &fakeScanner{found: found}
		live := map[string]bool{"u2": true}
		dp := &dataplane{log: slog.New(slog.NewTextHandler(io.Discard, nil)), podNetns: podNetnsProc, sandboxes: fs,
			alive: func(sb nodeinfo.Sandbox) bool { return live[sb.UID] }}
		dp.locate(bare, dp.scanOnce())
		if got := dp.locate(bare, dp.scanOnce()); got.Netns != "/proc/20/ns/net" || fs.calls != 1 {
			t.Errorf("second reconcile: netns %q after %d scans, want the cached sandbox and 1 scan", got.Netns, fs.calls)
		}
		live["u2"] = false // the sandbox process exited: its pid may be reused
		fs.found = map[string]nodeinfo.Sandbox{"u2": {UID: "u2", Netns: "/proc/30/ns/net"}}
		if got := dp.locate(bare, dp.scanOnce()); got.Netns != "/proc/30/ns/net" || fs.calls != 2 {
			t.Errorf("after the sandbox went: netns %q after %d scans, want a rescan", got.Netns, fs.calls)
		}
		dp.forgetLocated(map[string]bool{})
		if len(dp.located) != 0 {
			t.Errorf("forgetLocated kept %d entries for pods gone from the node", len(dp.located))
		}
	})

	t.Run("annotations mode never scans", func(t *testing.T) {
		dp := &dataplane{log: slog.New(slog.NewTextHandler(io.Discard, nil)), podNetns: podNetnsAnnotations}
		if got := dp.locate(bare, dp.scanOnce()); got.Netns != "" {
			t.Errorf("located %q with no scanner", got.Netns)
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
