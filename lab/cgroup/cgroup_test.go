package cgroup

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

func TestParseMountinfo(t *testing.T) {
	cases := []struct {
		in, want string
		err      bool
	}{
		{in: "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n", want: "/sys/fs/cgroup/unified"},
		{in: "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n", want: "/sys/fs/cgroup"},
		{in: "29 23 0:26 /sub /mnt/x rw - cgroup2 cgroup2 rw\n30 23 0:26 / /my\\040cg rw - cgroup2 cgroup2 rw\n", want: "/my cg"},
		{in: "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n", err: true},
	}
	for i, c := range cases {
		got, err := parseMountinfo(strings.NewReader(c.in))
		if (err != nil) != c.err || got != c.want {
			t.Errorf("case %d: got %q, %v; want %q, err=%v", i, got, err, c.want, c.err)
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
	cmd := exec.Command("sleep", "300")
	fd, err := unix.Open(child, unix.O_PATH|unix.O_DIRECTORY, 0)
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
