// Package cgroup finds the cgroup v2 hierarchy and creates, empties and
// removes the lab's cgroup directories.
//
// The hierarchy is found from /proc/self/mountinfo (read with
// agent/nodeinfo/mountinfo): it is /sys/fs/cgroup on a host with unified
// cgroups and /sys/fs/cgroup/unified on a hybrid one.
package cgroup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nodemesh/nodemesh/agent/nodeinfo/mountinfo"
)

// ErrNoCgroup2 means no cgroup2 filesystem is mounted.
var ErrNoCgroup2 = errors.New("no cgroup2 filesystem is mounted (mount -t cgroup2 none /sys/fs/cgroup)")

// Mount returns the mount point of the cgroup v2 hierarchy.
func Mount() (string, error) {
	mounts, err := mountinfo.Read("")
	if err != nil {
		return "", err
	}
	return v2Root(mounts)
}

// v2Root returns the first mount of the cgroup v2 hierarchy's root; bind
// mounts of a sub-tree are passed over.
func v2Root(mounts []mountinfo.Mount) (string, error) {
	for _, m := range mounts {
		if m.FSType == "cgroup2" && m.Root == "/" {
			return m.MountPoint, nil
		}
	}
	return "", ErrNoCgroup2
}

// V1Mounts lists the mount points of the cgroup v1 hierarchies' roots
// (there are some on a hybrid host, none on a unified one).
func V1Mounts() ([]string, error) {
	mounts, err := mountinfo.Read("")
	if err != nil {
		return nil, err
	}
	return v1Roots(mounts), nil
}

func v1Roots(mounts []mountinfo.Mount) []string {
	var out []string
	for _, m := range mounts {
		if m.FSType == "cgroup" && m.Root == "/" {
			out = append(out, m.MountPoint)
		}
	}
	return out
}

// Create makes dir (and parents) in the cgroup hierarchy.
func Create(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating cgroup %s: %w", dir, err)
	}
	return nil
}

// Procs returns the pids in dir itself (not its children).
func Procs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("reading %s/cgroup.procs: %w", dir, err)
	}
	var pids []int
	for _, f := range bytes.Fields(b) {
		if p, err := strconv.Atoi(string(f)); err == nil {
			pids = append(pids, p)
		}
	}
	return pids, nil
}

// Populated reports whether dir or any descendant holds a process.
func Populated(dir string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false, fmt.Errorf("reading %s/cgroup.events: %w", dir, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return strings.TrimSpace(v) == "1", nil
		}
	}
	return false, fmt.Errorf("%s/cgroup.events has no populated line", dir)
}

// Move writes pid into dir's cgroup.procs.
func Move(dir string, pid int) error {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return fmt.Errorf("moving pid %d into cgroup %s: %w", pid, dir, err)
	}
	return nil
}

// Kill kills every process in dir and its descendants (cgroup.kill) and
// waits until the sub-tree is empty or ctx ends.
func Kill(ctx context.Context, dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0o644); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if _, serr := os.Stat(dir); errors.Is(serr, fs.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("killing cgroup %s: cgroup.kill is missing (needs Linux 5.14 or later): %w", dir, err)
		}
		return fmt.Errorf("killing cgroup %s: %w", dir, err)
	}
	for delay := time.Millisecond; ; delay = min(delay*2, 100*time.Millisecond) {
		pop, err := Populated(dir)
		if err != nil {
			if _, serr := os.Stat(dir); errors.Is(serr, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !pop {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for cgroup %s to empty: %w", dir, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// Remove kills everything in dir's sub-tree and removes the directories,
// deepest first. A missing dir is not an error.
func Remove(ctx context.Context, dir string) error {
	if err := Kill(ctx, dir); err != nil {
		return err
	}
	return RemoveTree(ctx, dir, TreeOptions{})
}

// TreeOptions tune RemoveTree.
type TreeOptions struct {
	// Tries bounds the rmdir attempts per directory, 20 ms apart; default 50.
	Tries int
	// OnBusy, if set, runs after a failed rmdir of a directory and before
	// the next try: the hook to kill what still holds it (a cgroup v1
	// directory, whose processes cgroup.kill of the v2 tree cannot reach).
	OnBusy func(dir string)
}

// RemoveTree removes the directory tree of a cgroup (v2 or v1), deepest
// first, without killing anything itself (see Remove and
// TreeOptions.OnBusy). A missing dir is not an error.
func RemoveTree(ctx context.Context, dir string, o TreeOptions) error {
	if o.Tries <= 0 {
		o.Tries = 50
	}
	var dirs []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("listing cgroup %s: %w", dir, err)
	}
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	var errs []error
	for _, d := range dirs {
		// rmdir can briefly fail with EBUSY while the kernel finishes
		// tearing down killed tasks.
		var err error
		for try := 0; try < o.Tries; try++ {
			if err = os.Remove(d); err == nil || errors.Is(err, fs.ErrNotExist) {
				err = nil
				break
			}
			if o.OnBusy != nil {
				o.OnBusy(d)
			}
			select {
			case <-ctx.Done():
				try = o.Tries
			case <-time.After(20 * time.Millisecond):
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// Of returns the cgroup v2 path (relative to the hierarchy root) of pid.
func Of(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", fmt.Errorf("reading cgroup of pid %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("pid %d has no cgroup v2 entry", pid)
}
