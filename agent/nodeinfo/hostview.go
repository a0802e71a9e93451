package nodeinfo

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// HostView runs fn with the node's view of cgroup paths: on an OS thread
// that has joined the cgroup namespace of <proc>/1 (the node's init, under
// hostPID), so that /proc/<pid>/cgroup and mountinfo read inside fn show
// paths from the node's root cgroup. A container runtime gives the agent
// container a private cgroup namespace (the default with cgroup v2), which
// hides the names of the cgroups above it; without HostView a pod's cgroup
// could not always be named.
//
// When this process already shares that namespace (the lab, or a runtime
// without cgroup namespaces) fn runs on the calling goroutine. Joining needs
// CAP_SYS_ADMIN; the thread is discarded afterwards, never reused.
func HostView(proc string, fn func() error) error {
	if proc == "" {
		proc = "/proc"
	}
	self, err := nsInode(filepath.Join(proc, "self", "ns", "cgroup"))
	if err != nil {
		return fmt.Errorf("reading own cgroup namespace: %w", err)
	}
	hostPath := filepath.Join(proc, "1", "ns", "cgroup")
	host, err := nsInode(hostPath)
	if err != nil {
		return fmt.Errorf("reading the node's cgroup namespace (%s; the agent needs hostPID and CAP_SYS_PTRACE): %w", hostPath, err)
	}
	if self == host {
		return fn()
	}
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the thread leaves the process with this goroutine
		// instead of carrying the node's cgroup namespace to other
		// goroutines.
		runtime.LockOSThread()
		f, err := os.Open(hostPath)
		if err != nil {
			done <- fmt.Errorf("opening the node's cgroup namespace: %w", err)
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWCGROUP)
		f.Close()
		if err != nil {
			done <- fmt.Errorf("joining the node's cgroup namespace (needs CAP_SYS_ADMIN): %w", err)
			return
		}
		done <- fn()
	}()
	return <-done
}
