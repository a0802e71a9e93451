package nodeinfo

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/nodemesh/nodemesh/agent/nodeinfo/mountinfo"
)

// Layout is how a node mounts cgroups.
type Layout int

const (
	// LayoutUnified: cgroup v2 only, normally at /sys/fs/cgroup.
	LayoutUnified Layout = iota + 1
	// LayoutHybrid: cgroup v1 controllers at /sys/fs/cgroup/<controller>
	// and the v2 hierarchy, without controllers, at /sys/fs/cgroup/unified.
	LayoutHybrid
	// LayoutLegacy: cgroup v1 only; capture cannot work (no cgroup v2 to
	// attach cgroup/connect programs to).
	LayoutLegacy
)

func (l Layout) String() string {
	switch l {
	case LayoutUnified:
		return "unified"
	case LayoutHybrid:
		return "hybrid"
	case LayoutLegacy:
		return "legacy (cgroup v1 only)"
	}
	return "unknown"
}

// Sentinel errors of cgroup discovery; callers branch on them with errors.Is.
var (
	// ErrNoCgroup2 means no cgroup2 filesystem is mounted at all.
	ErrNoCgroup2 = errors.New("no cgroup v2 hierarchy is mounted; capture needs cgroup v2 " +
		"(boot with systemd.unified_cgroup_hierarchy=1 for the unified layout, or keep the hybrid layout's /sys/fs/cgroup/unified)")
	// ErrNoCgroup2Root means cgroup2 is mounted, but only below its root
	// (typically a container's own cgroup namespace), so the pods' cgroups
	// are out of reach.
	ErrNoCgroup2Root = errors.New("the cgroup v2 root is not visible: only a sub-tree is mounted here " +
		"(in a container, mount the host's /sys/fs/cgroup with a hostPath volume, as manifests/base/agent/daemonset.yaml does)")
)

// Hierarchy is the cgroup v2 hierarchy as this process can reach it.
type Hierarchy struct {
	// Path is the directory of the hierarchy's root cgroup (a mount point).
	Path string
	// Root is that mount's root as mountinfo shows it: relative to this
	// process's cgroup namespace. "/" on the host; "/../../.." in a
	// container with a private cgroup namespace three levels down, whose
	// /proc/<pid>/cgroup paths are relative to the same namespace root.
	Root string
	// Layout is unified or hybrid.
	Layout Layout
}

// IsRootCgroup reports whether dir is the root of a cgroup v2 hierarchy:
// the kernel leaves the files marked CFTYPE_NOT_ON_ROOT (cgroup.type,
// cgroup.events) out of the root only.
func IsRootCgroup(dir string) bool {
	if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err != nil {
		return false
	}
	_, err := os.Stat(filepath.Join(dir, "cgroup.type"))
	return errors.Is(err, os.ErrNotExist)
}

// FindHierarchy picks the cgroup v2 hierarchy root among mounts. isRoot
// tells whether a mount point is the hierarchy's root cgroup (IsRootCgroup
// on a live system). The first cgroup2 mount of the root wins (bind mounts
// of it are equivalent); mounts of sub-trees, such as a container's own
// /sys/fs/cgroup under a private cgroup namespace, are skipped.
func FindHierarchy(mounts []mountinfo.Mount, isRoot func(dir string) bool) (Hierarchy, error) {
	var v1, v2 bool
	var found *mountinfo.Mount
	for i := range mounts {
		m := &mounts[i]
		switch m.FSType {
		case "cgroup":
			v1 = true
		case "cgroup2":
			v2 = true
			if found == nil && isRoot(m.MountPoint) {
				found = m
			}
		}
	}
	switch {
	case !v2 && v1:
		return Hierarchy{Layout: LayoutLegacy}, fmt.Errorf("finding cgroup v2: the node mounts only cgroup v1: %w", ErrNoCgroup2)
	case !v2:
		return Hierarchy{}, fmt.Errorf("finding cgroup v2: %w", ErrNoCgroup2)
	case found == nil:
		return Hierarchy{}, fmt.Errorf("finding cgroup v2: %w", ErrNoCgroup2Root)
	}
	h := Hierarchy{Path: filepath.Clean(found.MountPoint), Root: found.Root, Layout: LayoutUnified}
	if v1 {
		h.Layout = LayoutHybrid
	}
	return h, nil
}

// DiscoverHierarchy reads <proc>/self/mountinfo ("/proc" when proc is
// empty) and finds the cgroup v2 hierarchy root.
func DiscoverHierarchy(proc string) (Hierarchy, error) {
	mounts, err := mountinfo.Read(proc)
	if err != nil {
		return Hierarchy{}, fmt.Errorf("finding cgroup v2: %w", err)
	}
	return FindHierarchy(mounts, IsRootCgroup)
}

// DiscoverNodeHierarchy is DiscoverHierarchy seen from the node's cgroup
// namespace nodeNS (HostView; NodeCgroupNS when empty), so Root is "/" and
// Dir can map every pod's cgroup even from a container with a private
// cgroup namespace. It needs hostPID.
func DiscoverNodeHierarchy(proc, nodeNS string) (Hierarchy, error) {
	var h Hierarchy
	err := HostView(nodeNS, func() error {
		var err error
		h, err = DiscoverHierarchy(proc)
		return err
	})
	return h, err
}

// Dir maps a cgroup path as /proc/<pid>/cgroup shows it to the directory
// under h.Path. Both that path and h.Root are relative to this process's
// cgroup namespace; a path that climbs above the namespace root ("/..")
// less far than the mount root does passes through cgroups whose names the
// kernel hid, and cannot be mapped: read it from the node's cgroup
// namespace instead (HostView). It also fails for a cgroup outside the
// mounted hierarchy.
func (h Hierarchy) Dir(cgroupPath string) (string, error) {
	if h.Path == "" {
		return "", errors.New("mapping a cgroup path: no cgroup v2 hierarchy")
	}
	if !strings.HasPrefix(cgroupPath, "/") {
		return "", fmt.Errorf("mapping cgroup path %q: not absolute", cgroupPath)
	}
	root := h.Root
	if root == "" {
		root = "/"
	}
	mUp, mRest := climb(root)
	pUp, pRest := climb(cgroupPath)
	switch {
	case pUp < mUp:
		return "", fmt.Errorf("mapping cgroup path %q: it is relative to a cgroup namespace that hides part of it (mount root %s); read it in the node's cgroup namespace", cgroupPath, root)
	case pUp > mUp:
		return "", fmt.Errorf("mapping cgroup path %q: outside the hierarchy mounted at %s (mount root %s)", cgroupPath, h.Path, root)
	}
	rel, ok := relUnder(mRest, pRest)
	if !ok {
		return "", fmt.Errorf("mapping cgroup path %q: outside the hierarchy mounted at %s (mount root %s)", cgroupPath, h.Path, root)
	}
	return filepath.Join(h.Path, rel), nil
}

// climb splits an absolute path into its leading "/.." count and the
// cleaned rest ("/" when nothing is left). path.Clean cannot be used first:
// it drops ".." at the root.
func climb(p string) (up int, rest string) {
	segs := strings.Split(strings.TrimPrefix(p, "/"), "/")
	for len(segs) > 0 && (segs[0] == ".." || segs[0] == "" || segs[0] == ".") {
		if segs[0] == ".." {
			up++
		}
		segs = segs[1:]
	}
	return up, path.Clean("/" + strings.Join(segs, "/"))
}

// relUnder returns p relative to dir, if p is dir or below it.
func relUnder(dir, p string) (string, bool) {
	if p == dir {
		return ".", true
	}
	if dir == "/" {
		return strings.TrimPrefix(p, "/"), true
	}
	rest, ok := strings.CutPrefix(p, dir+"/")
	return rest, ok
}

// PodsCgroup returns the directory under h that holds every pod's cgroup
// (kubelet's "kubepods": kubepods.slice with the systemd driver, kubepods
// with cgroupfs, possibly nested as in kind's kubelet.slice), or h.Path
// when there is none, so capture attached there sees every pod.
func (h Hierarchy) PodsCgroup() string {
	for _, rel := range []string{
		"kubepods.slice",
		"kubepods",
		"kubelet.slice/kubelet-kubepods.slice",
		"kubelet/kubepods",
	} {
		dir := filepath.Join(h.Path, rel)
		if st, err := os.Stat(dir); err == nil && st.IsDir() {
			return dir
		}
	}
	return h.Path
}
