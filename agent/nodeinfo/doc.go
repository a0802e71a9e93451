// Package nodeinfo is what the node agent needs to know about the real node
// it runs on, found without a CNI plugin:
//
//   - the cgroup v2 hierarchy (Hierarchy), read from /proc/self/mountinfo
//     for both layouts: unified (/sys/fs/cgroup) and hybrid
//     (/sys/fs/cgroup/unified, cgroup v1 controllers beside it), also from
//     inside a container whose own cgroup namespace hides the host's root;
//   - each local pod's network namespace (Scanner): under hostPID, every
//     process of a pod sits in a cgroup whose path carries the pod UID
//     (".../pod<uid>/<container>" with kubelet's cgroupfs driver,
//     ".../kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope"
//     with the systemd driver, whatever the runtime: containerd, CRI-O,
//     cri-dockerd), so the pod's netns is /proc/<pid>/ns/net of such a
//     process;
//   - start-up checks (Preflight) that refuse, with a message saying what to
//     change, a kernel or mount that cannot support capture.
//
// # Why /proc and not the CRI API
//
// The alternative is the container runtime's CRI socket
// (/run/containerd/containerd.sock, /var/run/crio/crio.sock):
// RuntimeService.PodSandboxStatus(verbose) returns, in its runtime-specific
// "info" map, the sandbox's netns path (containerd) or its pid. That needs
// the socket mounted into the agent (which is root-equivalent on the node:
// it can start privileged containers), a gRPC client for each runtime's
// undocumented verbose format, and it still needs hostPID to use a pid. The
// /proc scan needs only hostPID and read access to /proc, works the same
// for every runtime and cgroup driver, and its result is checked against
// the kernel (the netns link is opened and the process's cgroup re-read, so
// a recycled pid is caught). Its cost is a read of /proc/<pid>/cgroup per
// process on the node; the agent scans when it learns of a new local pod,
// not per connection.
package nodeinfo
