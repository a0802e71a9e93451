package redirect

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/nodeinfo/mountinfo"
)

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy, read from
// /proc/self/mountinfo (it is /sys/fs/cgroup on unified hosts and
// /sys/fs/cgroup/unified on hybrid ones).
func Cgroup2Mount() (string, error) {
	mounts, err := mountinfo.Read("")
	if err != nil {
		return "", fmt.Errorf("reading mounts: %w", err)
	}
	return firstMount(mounts, "cgroup2")
}

// firstMount returns the first mount point of filesystem type fstype.
func firstMount(mounts []mountinfo.Mount, fstype string) (string, error) {
	for _, m := range mounts {
		if m.FSType == fstype {
			return m.MountPoint, nil
		}
	}
	return "", fmt.Errorf("no %s filesystem is mounted", fstype)
}

// OwnCgroup returns the absolute path of the calling process's cgroup v2.
func OwnCgroup() (string, error) {
	mnt, err := Cgroup2Mount()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", fmt.Errorf("reading own cgroup: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(mnt, rel), nil
		}
	}
	return "", errors.New("reading own cgroup: no cgroup v2 entry in /proc/self/cgroup")
}

// cgroupID returns the id of the cgroup v2 directory at path (its inode).
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("reading cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// isCgroup2 reports an actionable error unless path is a cgroup v2 directory.
func isCgroup2(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("opening cgroup %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not in a cgroup v2 hierarchy; capture needs cgroup v2 (find it in /proc/self/mountinfo)", path)
	}
	return nil
}

// within reports whether path is dir or below it.
func within(path, dir string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// ensureBPFFS mounts bpffs at dir's mount point when no bpf filesystem holds
// dir yet.
func ensureBPFFS(dir string) error {
	var st unix.Statfs_t
	probe := dir
	for {
		if err := unix.Statfs(probe, &st); err == nil {
			break
		}
		parent := filepath.Dir(probe)
		if parent == probe {
			return fmt.Errorf("checking bpffs for %s: no existing parent", dir)
		}
		probe = parent
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	const root = "/sys/fs/bpf"
	if !within(dir, root) {
		return fmt.Errorf("pin directory %s is not on a bpf filesystem; mount one (mount -t bpf bpf %s) or use a path under %s", dir, filepath.Dir(dir), root)
	}
	if err := unix.Statfs(root, &st); err != nil {
		return fmt.Errorf("checking %s: %w", root, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mounting bpffs at %s: %w", root, err)
	}
	return nil
}
