package nodeinfo

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// NodeCgroupNS is the node's cgroup namespace as the agent sees it under
// hostPID: that of the node's init process.
const NodeCgroupNS = "/proc/1/ns/cgroup"

// HostView runs fn with the node's view of cgroup paths: on an OS thread
// that has joined the cgroup namespace nodeNS (NodeCgroupNS when empty), so
// that /proc/<pid>/cgroup and mountinfo read inside fn show
// paths from the node's root cgroup. A container runtime gives the agent
// container a private cgroup namespace (the default with cgroup v2), which
// hides the names of the cgroups above it; without HostView a pod's cgroup
// could not always be named.
//
// fn runs on a fresh locked goroutine, which joins the namespace unless its
// thread is in it already (the lab, or a runtime without cgroup
// namespaces). Joining needs CAP_SYS_ADMIN; the thread is discarded
// afterwards, never reused. fn must not start goroutines that read cgroup
// paths: they would run on other threads. Beware that an exiting thread
// delivers Pdeathsig to the children forked from it: processes started with
// SysProcAttr.Pdeathsig may be killed when a HostView thread ends.
func HostView(nodeNS string, fn func() error) error {
	hostPath := nodeNS
	if hostPath == "" {
		hostPath = NodeCgroupNS
	}
	host, err := nsInode(hostPath)
	if err != nil {
		return fmt.Errorf("reading the node's cgroup namespace (%s; the agent needs hostPID and CAP_SYS_PTRACE): %w", hostPath, err)
	}
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the thread leaves the process with this goroutine
		// (or, if it is the main thread, is parked for good) instead of
		// carrying the node's cgroup namespace to other goroutines.
		runtime.LockOSThread()
		// This thread's namespace, not /proc/self's: that is the main
		// thread's, which an earlier HostView may have moved.
		self, err := nsInode("/proc/thread-self/ns/cgroup")
		if err != nil {
			done <- fmt.Errorf("reading own cgroup namespace: %w", err)
			return
		}
		if self != host {
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
		}
		done <- fn()
	}()
	return <-done
}
