package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/nodemesh/nodemesh/agent/nodeinfo/mountinfo"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/netns"
)

// Sweep removes everything of cluster id: it kills every process in the
// cluster's cgroup (nodes' inits, containerd, shims, containers, kubelets,
// controllers) and the API server recorded in stateDir, which also ends
// the nodes' mount namespaces and with them every mount, pod network
// namespace and BPF pin of the nodes; then it removes the cgroups in every
// hierarchy, the network namespaces and links named nm-<id>..., and the
// state directory. It works after the creating process was killed.
func Sweep(ctx context.Context, id, stateDir string) error {
	if !lab.ValidID(id) {
		return fmt.Errorf("cluster ID %q: want 1-6 lower-case letters or digits", id)
	}
	prefix := lab.Prefix + id
	var errs []error
	apiserver.Sweep(filepath.Join(stateDir, "apiserver"))
	if cg2, err := cgroup.Mount(); err == nil {
		if err := cgroup.Remove(ctx, filepath.Join(cg2, prefix)); err != nil {
			errs = append(errs, err)
		}
	} else {
		errs = append(errs, err)
	}
	v1, err := cgroup.V1Mounts()
	if err != nil {
		errs = append(errs, err)
	}
	for _, m := range v1 {
		if err := removeTree(ctx, filepath.Join(m, prefix)); err != nil {
			errs = append(errs, err)
		}
	}
	nss, err := netns.List(prefix + "-")
	if err != nil {
		errs = append(errs, err)
	}
	for _, ns := range nss {
		if err := netns.IP(ctx, "", []string{"netns del " + ns}); err != nil {
			errs = append(errs, err)
		}
	}
	if links, err := os.ReadDir("/sys/class/net"); err == nil {
		for _, l := range links {
			if strings.HasPrefix(l.Name(), prefix+"-") {
				if err := netns.IP(ctx, "", []string{"link del " + l.Name()}); err != nil && linkExists(l.Name()) {
					errs = append(errs, err)
				}
			}
		}
	}
	if len(errs) == 0 && stateDir != "" {
		if err := os.RemoveAll(stateDir); err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", stateDir, err))
		}
	}
	return errors.Join(errs...)
}

func linkExists(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", name))
	return err == nil
}

// removeTree removes a cgroup v1 directory tree, deepest first, once its
// processes are gone (they were killed through the v2 hierarchy). A
// process can still sit in a v1 cgroup of the cluster when it was never in
// the cluster's v2 sub-tree; it is killed there while rmdir is refused.
func removeTree(ctx context.Context, dir string) error {
	return cgroup.RemoveTree(ctx, dir, cgroup.TreeOptions{Tries: 100, OnBusy: func(d string) {
		pids, _ := cgroup.Procs(d)
		for _, pid := range pids {
			if pid > 1 {
				_ = killPid(pid)
			}
		}
	}})
}

// Leftovers lists what of cluster id exists on the machine: besides the
// lab's inventory (processes, v2 cgroups, network namespaces, links,
// nftables tables, BPF pins), cgroup v1 directories and mounts whose
// source or target names the state directory.
func Leftovers(id, stateDir string) ([]string, error) {
	out, err := lab.Leftovers(id)
	if err != nil {
		return nil, err
	}
	v1, err := cgroup.V1Mounts()
	if err != nil {
		return nil, err
	}
	for _, m := range v1 {
		if _, err := os.Stat(filepath.Join(m, lab.Prefix+id)); err == nil {
			out = append(out, "cgroup "+filepath.Join(m, lab.Prefix+id))
		}
	}
	mounts, err := mountinfo.Read("")
	if err != nil {
		return nil, err
	}
	for _, m := range mounts {
		if stateDir != "" && (strings.Contains(m.MountPoint, stateDir) || strings.Contains(m.Root, stateDir) || strings.Contains(m.Source, stateDir)) {
			out = append(out, fmt.Sprintf("mount %s (%s %s, root %s)", m.MountPoint, m.FSType, m.Source, m.Root))
		}
	}
	if _, err := os.Stat(stateDir); err == nil {
		out = append(out, "state directory "+stateDir)
	}
	return out, nil
}
