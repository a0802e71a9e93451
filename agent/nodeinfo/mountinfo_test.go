package nodeinfo

import (
	"errors"
	"strings"
	"testing"

	"github.com/nodemesh/nodemesh/agent/nodeinfo/mountinfo"
)

// Mount tables as the kernel prints them, trimmed to the lines that matter.
const (
	// This project's development VM: hybrid layout, no cgroup namespace.
	hybridHost = `23 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
46 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
`
	// A systemd node with unified cgroups.
	unifiedHost = `22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 22 0:24 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:5 - bpf bpf rw,mode=700
`
	// The agent container on a unified node: its own cgroup namespace
	// (its /sys/fs/cgroup shows the container's cgroup as "/") and the
	// host's hierarchy bind-mounted by a hostPath volume, shown relative to
	// the container's namespace root, four levels down.
	unifiedContainer = `812 700 0:310 / / rw,relatime master:300 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
820 812 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
830 812 0:23 /../../../.. /host/sys/fs/cgroup ro,relatime master:4 - cgroup2 cgroup2 rw,nsdelegate
831 812 0:24 / /sys/fs/bpf rw,relatime master:5 - bpf bpf rw,mode=700
`
	// The same container without the hostPath volume.
	containerNoHost = `812 700 0:310 / / rw,relatime - overlay overlay rw
820 812 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
`
	// A hybrid node's container: the v1 controllers and the unified
	// sub-mount come along with the recursive hostPath bind.
	hybridContainer = `900 800 0:400 / / rw - overlay overlay rw
905 900 0:401 / /sys/fs/cgroup rw - tmpfs tmpfs rw
906 905 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
910 900 0:28 / /host/sys/fs/cgroup ro - tmpfs tmpfs rw,mode=755
911 910 0:29 / /host/sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu
912 910 0:38 /../.. /host/sys/fs/cgroup/unified ro - cgroup2 cgroup2 rw
`
	legacyHost = `31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw
32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
`
	noCgroups = `23 1 8:1 / / rw - ext4 /dev/sda1 rw
`
)

func mustMounts(t *testing.T, s string) []mountinfo.Mount {
	t.Helper()
	m, err := mountinfo.Parse(strings.NewReader(s))
	if err != nil {
		t.Fatalf("mountinfo.Parse: %v", err)
	}
	return m
}

func TestFindHierarchy(t *testing.T) {
	// roots are the mount points that are a hierarchy's root cgroup (on a
	// live system, IsRootCgroup decides).
	tests := []struct {
		name    string
		info    string
		roots   []string
		want    Hierarchy
		wantErr error
	}{
		{"hybrid host", hybridHost, []string{"/sys/fs/cgroup/unified"},
			Hierarchy{Path: "/sys/fs/cgroup/unified", Root: "/", Layout: LayoutHybrid}, nil},
		{"unified host", unifiedHost, []string{"/sys/fs/cgroup"},
			Hierarchy{Path: "/sys/fs/cgroup", Root: "/", Layout: LayoutUnified}, nil},
		{"unified container with host mount", unifiedContainer, []string{"/host/sys/fs/cgroup"},
			Hierarchy{Path: "/host/sys/fs/cgroup", Root: "/../../../..", Layout: LayoutUnified}, nil},
		{"hybrid container with host mount", hybridContainer, []string{"/host/sys/fs/cgroup/unified"},
			Hierarchy{Path: "/host/sys/fs/cgroup/unified", Root: "/../..", Layout: LayoutHybrid}, nil},
		{"container without host mount", containerNoHost, nil, Hierarchy{}, ErrNoCgroup2Root},
		{"legacy host", legacyHost, nil, Hierarchy{Layout: LayoutLegacy}, ErrNoCgroup2},
		{"no cgroups", noCgroups, nil, Hierarchy{}, ErrNoCgroup2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			isRoot := func(dir string) bool {
				for _, r := range tt.roots {
					if r == dir {
						return true
					}
				}
				return false
			}
			got, err := FindHierarchy(mustMounts(t, tt.info), isRoot)
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestHierarchyDir(t *testing.T) {
	host := Hierarchy{Path: "/sys/fs/cgroup", Root: "/", Layout: LayoutUnified}
	ctr := Hierarchy{Path: "/host/sys/fs/cgroup", Root: "/../../../..", Layout: LayoutUnified}
	// A sub-tree mount: only kubepods.slice is mounted.
	sub := Hierarchy{Path: "/mnt/pods", Root: "/kubepods.slice", Layout: LayoutUnified}
	tests := []struct {
		h       Hierarchy
		in      string
		want    string
		wantErr bool
	}{
		{host, "/kubepods.slice/kubepods-pod1.slice", "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice", false},
		{host, "/", "/sys/fs/cgroup", false},
		// Seen from the agent container, whose cgroup is
		// /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope,
		// the kernel prints the path through the common ancestor
		// /kubepods.slice: three levels up, then down.
		// The name of that ancestor is hidden: refuse, never guess.
		{ctr, "/../../../kubepods-besteffort.slice/x.slice", "", true},
		{ctr, "/", "", true},
		// A path through the namespace's outermost ancestor is complete.
		{ctr, "/../../../../system.slice/containerd.service",
			"/host/sys/fs/cgroup/system.slice/containerd.service", false},
		{ctr, "/../../../../..", "", true},
		{host, "/..", "", true},
		{sub, "/kubepods.slice/a.slice", "/mnt/pods/a.slice", false},
		{sub, "/system.slice/containerd.service", "", true},
		{sub, "/kubepods.slicex", "", true},
		{host, "relative/path", "", true},
	}
	for _, tt := range tests {
		got, err := tt.h.Dir(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("%+v.Dir(%q): error %v, wantErr %v", tt.h, tt.in, err, tt.wantErr)
			continue
		}
		if got != tt.want {
			t.Errorf("%+v.Dir(%q) = %q, want %q", tt.h, tt.in, got, tt.want)
		}
	}
}
