package cgroup

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/nodeinfo/mountinfo"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

func TestRoots(t *testing.T) {
	cases := []struct {
		in, want string
		v1       []string
		err      bool
	}{
		{in: "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", want: "/sys/fs/cgroup/unified", v1: []string{"/sys/fs/cgroup/cpu"}},
		{in: "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n", want: "/sys/fs/cgroup"},
		{in: "29 23 0:26 /sub /mnt/x rw - cgroup2 cgroup2 rw\n30 23 0:26 / /my\\040cg rw - cgroup2 cgroup2 rw\n", want: "/my cg"},
		{in: "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n33 31 0:29 /sub /mnt/cpu rw - cgroup cgroup rw,cpu\n", v1: []string{"/sys/fs/cgroup/cpu"}, err: true},
	}
	for i, c := range cases {
		mounts, err := mountinfo.Parse(strings.NewReader(c.in))
		if err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		got, err := v2Root(mounts)
		if (err != nil) != c.err || got != c.want {
			t.Errorf("case %d: got %q, %v; want %q, err=%v", i, got, err, c.want, c.err)
		}
		if v1 := v1Roots(mounts); !slices.Equal(v1, c.v1) {
			t.Errorf("case %d: v1 roots %q, want %q", i, v1, c.v1)
		}
	}
}

func TestPrivCgroupKillRemove(t *testing.T) {
	privtest.Root(t)
	root, err := Mount()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "nmtcgroup")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_ = Remove(ctx, dir) // a killed earlier run
	t.Cleanup(func() { _ = Remove(context.Background(), dir) })

	child := filepath.Join(dir, "a", "b")
	if err := Create(child); err != nil {
		t.Fatal(err)
	}
	cmd, done := sleepIn(t, child)
	cg, err := Of(cmd.Process.Pid)
	if err != nil || cg != "/nmtcgroup/a/b" {
		t.Fatalf("child cgroup = %q, %v", cg, err)
	}
	pids, err := Procs(child)
	if err != nil || len(pids) != 1 || pids[0] != cmd.Process.Pid {
		t.Fatalf("Procs = %v, %v", pids, err)
	}
	if pop, err := Populated(dir); err != nil || !pop {
		t.Fatalf("Populated = %v, %v", pop, err)
	}
	if err := Remove(ctx, dir); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the process survived Remove")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists: %v", dir, err)
	}
	if err := Remove(ctx, dir); err != nil {
		t.Errorf("removing a missing cgroup: %v", err)
	}
}

// sleepIn starts a sleep in cgroup dir; done reports its exit.
func sleepIn(t *testing.T, dir string) (*exec.Cmd, <-chan error) {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	err = cmd.Start()
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	return cmd, done
}

// TestPrivRemoveTreeOnBusy: RemoveTree kills nothing itself; a directory
// still holding a process is removed once the OnBusy hook has killed it.
func TestPrivRemoveTreeOnBusy(t *testing.T) {
	privtest.Root(t)
	root, err := Mount()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "nmtcgroup-busy")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_ = Remove(ctx, dir)
	t.Cleanup(func() { _ = Remove(context.Background(), dir) })
	child := filepath.Join(dir, "a")
	if err := Create(child); err != nil {
		t.Fatal(err)
	}
	_, done := sleepIn(t, child)

	if err := RemoveTree(ctx, dir, TreeOptions{Tries: 3}); err == nil {
		t.Fatal("RemoveTree without a hook removed a cgroup that holds a process")
	}
	var busy []string
	err = RemoveTree(ctx, dir, TreeOptions{OnBusy: func(d string) {
		busy = append(busy, d)
		pids, _ := Procs(d)
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(busy) == 0 || busy[0] != child {
		t.Errorf("OnBusy ran for %q, want %s first", busy, child)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the process survived the OnBusy hook")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists: %v", dir, err)
	}
}
