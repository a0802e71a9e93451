package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/cluster/image"
	"github.com/nodemesh/nodemesh/lab/netns"
)

func (c *Cluster) newNode(i int) *Node {
	name := nodeName(i)
	ip := c.underlay.Addr()
	for j := 0; j < 10+i; j++ {
		ip = ip.Next()
	}
	return &Node{
		Name:   name,
		IP:     ip.String(),
		Netns:  netns.Path(c.prefix + "-" + name),
		Dir:    filepath.Join(c.Dir, name),
		Cgroup: filepath.Join(c.cgroup, name),
		Socket: filepath.Join(c.Dir, name, "run", "containerd", "containerd.sock"),
		link:   c.prefix + "-n" + strconv.Itoa(i),
	}
}

// Hostname is node n's hostname (nm-<id>-nodeN), which differs from its
// node name, as under kubelet's --hostname-override: nothing of nodemesh may
// take one for the other.
func (c *Cluster) Hostname(n *Node) string { return c.prefix + "-" + n.Name }

// cgroupRoot is the node's kubelet --cgroup-root: the same relative path in
// the v2 hierarchy (Node.Cgroup) and in every v1 hierarchy.
func (c *Cluster) cgroupRoot(n *Node) string { return "/" + c.prefix + "/" + n.Name }

// setupNode creates the node's network namespace and cgroups, writes its
// configuration and starts its init (containerd, kubelet, kube-proxy),
// then loads the images into its containerd.
func (c *Cluster) setupNode(ctx context.Context, n *Node, opts Options, token string) error {
	ns := filepath.Base(n.Netns)
	if err := netns.IP(ctx, "", []string{
		"netns add " + ns,
		"link add " + n.link + " type veth peer name eth0 netns " + ns,
		"link set dev " + n.link + " addrgenmode none",
		"link set dev " + n.link + " master " + c.prefix + "-br",
		"link set dev " + n.link + " up",
	}); err != nil {
		return fmt.Errorf("creating node %s: %w", n.Name, err)
	}
	for _, kv := range [][2]string{
		{"net/ipv4/ip_forward", "1"},
		{"net/ipv4/conf/all/rp_filter", "0"},
		{"net/ipv4/conf/default/rp_filter", "0"},
	} {
		if err := netns.WriteSysctl(n.Netns, kv[0], kv[1]); err != nil {
			return fmt.Errorf("configuring node %s: %w", n.Name, err)
		}
	}
	if err := netns.IP(ctx, ns, []string{
		"link set dev lo up",
		"addr add " + n.IP + "/" + strconv.Itoa(c.underlay.Bits()) + " dev eth0",
		"link set dev eth0 up",
		// The node's own connects to a ClusterIP (the agent's, to the API
		// server and the CA) need a route before kube-proxy's DNAT.
		"route add " + c.Server.ServiceCIDR + " dev eth0",
	}); err != nil {
		return fmt.Errorf("configuring node %s's network: %w", n.Name, err)
	}
	if err := c.makeCgroups(n); err != nil {
		return err
	}
	for _, d := range []string{"run", "var-lib", "var-log", "sysctl", n.hostPath(NodeCNIConfDir), n.hostPath(NodeCNIBinDir)} {
		if err := os.MkdirAll(filepath.Join(n.Dir, d), 0o755); err != nil {
			return fmt.Errorf("creating node %s's directories: %w", n.Name, err)
		}
	}
	if err := linkCNIPlugins(filepath.Join(n.Dir, n.hostPath(NodeCNIBinDir))); err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	if err := c.writeNodeConfig(n, token); err != nil {
		return err
	}
	// A PID namespace of its own, as a kind node container has: the
	// agent's hostPID then shows the node's processes with the node's init
	// as PID 1, whose namespaces it reads (agent/nodeinfo). (The host's own
	// PID 1 may not be readable at all: on the CI machines it is a
	// supervisor whose /proc/1/ns links refuse even full root with EACCES.)
	// --kill-child: if unshare dies, the node's init gets SIGKILL, and with
	// it every process of the node's PID namespace, containers included.
	// And a UTS namespace, whose hostname host-network pods (the agent)
	// see as theirs: Hostname, not the node name, as on a real node
	// whose kubelet runs with --hostname-override (as these do).
	cmd := exec.Command("unshare", "--mount", "--propagation", "slave", "--pid", "--kill-child", "--mount-proc", "--uts",
		"/bin/sh", filepath.Join(n.Dir, "init.sh"))
	logf, err := os.OpenFile(filepath.Join(n.Dir, "init.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("opening node %s's init log: %w", n.Name, err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"}
	if err := startIn(cmd, n.Netns, n.Cgroup); err != nil {
		return fmt.Errorf("starting node %s: %w", n.Name, err)
	}
	n.init = cmd
	if err := poll(ctx, 10*time.Second, "node "+n.Name+"'s init", func() (bool, string, error) {
		if pidGone(cmd.Process.Pid) {
			return false, "", fmt.Errorf("node %s's init exited; %s ends with:\n%s", n.Name, filepath.Join(n.Dir, "init.log"), logTail(filepath.Join(n.Dir, "init.log"), 2000))
		}
		pid, err := childOf(cmd.Process.Pid)
		n.InitPid = pid
		return err == nil, fmt.Sprint(err), nil
	}); err != nil {
		return err
	}
	if err := poll(ctx, time.Minute, "containerd on "+n.Name, func() (bool, string, error) {
		if pidGone(cmd.Process.Pid) {
			return false, "", fmt.Errorf("node %s's init exited; %s ends with:\n%s\ncontainerd.log:\n%s", n.Name, filepath.Join(n.Dir, "init.log"), logTail(filepath.Join(n.Dir, "init.log"), 2000), logTail(filepath.Join(n.Dir, "containerd.log"), 2000))
		}
		_, err := os.Stat(n.Socket)
		return err == nil, "no socket " + n.Socket, nil
	}); err != nil {
		return err
	}
	if opts.Images != "" {
		start := time.Now()
		if err := c.Import(ctx, n, opts.Images); err != nil {
			return err
		}
		c.log.Info("images imported", "node", n.Name, "after", time.Since(start).Round(time.Millisecond))
	}
	return nil
}

// Import loads an image archive into the node's containerd (namespace
// k8s.io, the one the CRI plugin uses), as `ctr images import` would on a
// real node.
func (c *Cluster) Import(ctx context.Context, n *Node, archive string) error {
	out, err := exec.CommandContext(ctx, "ctr", "--address", n.Socket, "-n", "k8s.io", "images", "import", archive).CombinedOutput()
	if err != nil {
		return fmt.Errorf("importing %s into node %s's containerd: %w\n%s", archive, n.Name, err, out)
	}
	return nil
}

// makeCgroups creates the node's kubelet cgroup root in every cgroup v1
// hierarchy (hybrid hosts) and its directory in the v2 one.
func (c *Cluster) makeCgroups(n *Node) error {
	if err := cgroup.Create(n.Cgroup); err != nil {
		return err
	}
	v1, err := cgroup.V1Mounts()
	if err != nil {
		return err
	}
	for _, m := range v1 {
		dir := m
		for _, part := range strings.Split(strings.TrimPrefix(c.cgroupRoot(n), "/"), "/") {
			parent := dir
			dir = filepath.Join(dir, part)
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				return fmt.Errorf("creating cgroup %s: %w", dir, err)
			}
			// A new v1 cpuset starts with no CPUs and no memory nodes.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if b, err := os.ReadFile(filepath.Join(parent, f)); err == nil {
					cur, _ := os.ReadFile(filepath.Join(dir, f))
					if strings.TrimSpace(string(cur)) == "" {
						if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
							return fmt.Errorf("initialising %s/%s: %w", dir, f, err)
						}
					}
				}
			}
		}
	}
	return nil
}

// Host sysctls kubelet sets when they differ (setupKernelTunables) and
// the values it wants. They are not per network namespace: on a shared
// machine kubelet would change them for everyone (panic_on_oops=1 turns
// any kernel oops into a reboot). Each node's mount namespace shows kubelet
// files with the values it wants instead, so it leaves the host alone.
var kubeletSysctls = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// writeNodeConfig writes the node's kubeconfigs, containerd, kubelet and
// kube-proxy configuration and its init script.
func (c *Cluster) writeNodeConfig(n *Node, token string) error {
	if err := c.writeKubeconfig(filepath.Join(n.Dir, "kubelet.kubeconfig"), token); err != nil {
		return err
	}
	if err := c.writeKubeconfig(filepath.Join(n.Dir, "kube-proxy.kubeconfig"), c.tokens["system:kube-proxy"]); err != nil {
		return err
	}
	containerd := fmt.Sprintf(`# containerd of cluster node %[1]s (nodemesh cluster tier). Paths are the
# defaults; the node's mount namespace makes /run, /var/lib and /var/log
# private to it.
version = 2
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[2]q
  # kubelet asks for oom_score_adj -998 for every sandbox; lowering it needs
  # CAP_SYS_RESOURCE, which root lacks on the CI machines (runc then fails
  # with "failed to update /proc/self/oom_score_adj: Permission denied",
  # surfacing as "can't get final child's PID from pipe: EOF"). Clamp
  # containers to containerd's own score instead, as rootless setups do.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # kubelet's cgroupDriver is cgroupfs (no systemd on these nodes).
        SystemdCgroup = false
  # The node's own CNI directories (NodeCNIConfDir, NodeCNIBinDir, in the
  # node's /var/lib): nodemesh's agent chains its plugin in there.
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[3]q
    conf_dir = %[4]q
`, n.Name, image.Pause, NodeCNIBinDir, NodeCNIConfDir)
	files := map[string][]byte{"containerd.toml": []byte(containerd)}

	kubelet := map[string]any{
		"apiVersion":               "kubelet.config.k8s.io/v1beta1",
		"kind":                     "KubeletConfiguration",
		"containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
		// Hybrid (and v1) hosts: libcontainer's cgroupfs manager; there is
		// no systemd to delegate to.
		"cgroupDriver":       "cgroupfs",
		"cgroupRoot":         c.cgroupRoot(n),
		"cgroupsPerQOS":      true,
		"failCgroupV1":       false,
		"failSwapOn":         false,
		"address":            n.IP,
		"port":               10250,
		"readOnlyPort":       0,
		"healthzPort":        10248,
		"healthzBindAddress": "127.0.0.1",
		"authentication": map[string]any{
			"anonymous": map[string]any{"enabled": false},
			"webhook":   map[string]any{"enabled": true},
			"x509":      map[string]any{"clientCAFile": c.Server.CAFile},
		},
		"authorization": map[string]any{"mode": "Webhook"},
		"clusterDomain": "cluster.local",
		"resolvConf":    "",
		// The images are imported, never pulled: never collect them, and
		// never evict pods because the shared disk is filling up.
		"imageGCHighThresholdPercent": 100,
		"imageGCLowThresholdPercent":  99,
		"evictionHard": map[string]string{
			"memory.available": "0%", "nodefs.available": "0%", "nodefs.inodesFree": "0%", "imagefs.available": "0%",
		},
		"localStorageCapacityIsolation": false,
		"serializeImagePulls":           false,
		"maxPods":                       110,
		"nodeStatusUpdateFrequency":     "4s",
		"syncFrequency":                 "10s",
		"fileCheckFrequency":            "10s",
		"protectKernelDefaults":         false,
		"shutdownGracePeriod":           "0s",
	}
	proxy := map[string]any{
		"apiVersion":         "kubeproxy.config.k8s.io/v1alpha1",
		"kind":               "KubeProxyConfiguration",
		"mode":               "nftables",
		"clientConnection":   map[string]any{"kubeconfig": filepath.Join(n.Dir, "kube-proxy.kubeconfig")},
		"hostnameOverride":   n.Name,
		"clusterCIDR":        ClusterCIDR,
		"metricsBindAddress": "127.0.0.1:10249",
		"healthzBindAddress": "127.0.0.1:10256",
		// Leave the host-wide conntrack settings alone.
		"conntrack": map[string]any{"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
	}
	for name, v := range map[string]any{"kubelet.json": kubelet, "kube-proxy.json": proxy} {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return fmt.Errorf("encoding %s: %w", name, err)
		}
		files[name] = b
	}

	var binds strings.Builder
	for key, want := range kubeletSysctls {
		cur, err := os.ReadFile(filepath.Join("/proc/sys", key))
		if err != nil || strings.TrimSpace(string(cur)) == want {
			continue
		}
		f := filepath.Join(n.Dir, "sysctl", strings.ReplaceAll(key, "/", "."))
		if err := os.WriteFile(f, []byte(want+"\n"), 0o444); err != nil {
			return fmt.Errorf("writing %s: %w", f, err)
		}
		fmt.Fprintf(&binds, "mount --bind %s /proc/sys/%s || exit 1\n", f, key)
	}
	files["init.sh"] = []byte(fmt.Sprintf(`#!/bin/sh
# Init of cluster node %[1]s: runs in the node's network namespace and in a
# mount namespace of its own (unshare --propagation slave: host mounts come
# in, the node's never go out). Everything it mounts, and every pod network
# namespace containerd pins under /run/netns, goes away with the namespace.
set -u
D=%[2]s
B=%[3]s
hostname %[6]s || exit 1
mount --bind "$D/run" /run || exit 1
mount --bind "$D/var-lib" /var/lib || exit 1
mount --bind "$D/var-log" /var/log || exit 1
mkdir -p /run/netns /run/containerd /var/lib/kubelet /var/log/pods
# The agent's pins: a bpffs instance of this node's own.
mount -t bpf bpf /sys/fs/bpf || exit 1
%[4]s# kubelet wants shared mounts (mountPropagation, its own volume mounts).
mount --make-rshared / || exit 1
# containerd is supervised like a service: restarted when it exits
# (RestartContainerd), until the node stops.
(
  while [ ! -e "$D/stopping" ]; do
    containerd --config "$D/containerd.toml" >>"$D/containerd.log" 2>&1 &
    echo $! >"$D/containerd.pid"
    wait $!
    echo "containerd exited ($?)" >&2
    [ -e "$D/stopping" ] || sleep 0.2
  done
) &
S=$!
i=0
while [ ! -S /run/containerd/containerd.sock ]; do
  i=$((i+1))
  if [ $i -gt 1200 ]; then echo "containerd did not start" >&2; touch "$D/stopping"; kill $(cat "$D/containerd.pid") 2>/dev/null; exit 1; fi
  sleep 0.05
done
"$B/kubelet" --config="$D/kubelet.json" --kubeconfig="$D/kubelet.kubeconfig" --hostname-override=%[1]s --node-ip=%[5]s --v=1 >>"$D/kubelet.log" 2>&1 &
K=$!
"$B/kube-proxy" --config="$D/kube-proxy.json" --v=1 >>"$D/kube-proxy.log" 2>&1 &
P=$!
stop() {
  kill -TERM $K $P 2>/dev/null
  wait $K $P
  touch "$D/stopping"
  kill -TERM $(cat "$D/containerd.pid") 2>/dev/null
  wait $S
  exit 0
}
trap stop TERM INT
wait
`, n.Name, shq(n.Dir), shq(c.BinDir), binds.String(), n.IP, c.Hostname(n)))
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(n.Dir, name), b, 0o600); err != nil {
			return fmt.Errorf("writing node %s's %s: %w", n.Name, name, err)
		}
	}
	return nil
}

// writeCNI writes the node's CNI configuration for its pod CIDR: a bridge
// with host-local addresses, no masquerading (pods keep their IPs across
// nodes; routeNodes routes between nodes).
func writeCNI(n *Node) error {
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "nodemesh-cluster",
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
				"ipam": map[string]any{
					"type":   "host-local",
					"ranges": []any{[]any{map[string]any{"subnet": n.PodCIDR}}},
					"routes": []any{map[string]any{"dst": "0.0.0.0/0"}},
				},
			},
		},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the CNI configuration: %w", err)
	}
	p := filepath.Join(n.Dir, n.hostPath(NodeCNIConfDir), "10-nodemesh.conflist")
	if err := os.WriteFile(p+".tmp", b, 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", p, err)
	}
	return os.Rename(p+".tmp", p)
}

// Where each node keeps its CNI configuration and plugins, as the node's
// processes (containerd, kubelet's hostPath volumes) see them: under the
// node's own /var/lib, which init.sh binds to Node.Dir/var-lib, so every
// node has its own behind one path. The real nodes' /etc/cni/net.d and
// /opt/cni/bin are the host's here; manifests/overlays/cluster points the
// agent's CNI volumes at these instead (as on distributions that move
// them).
const (
	NodeCNIConfDir = "/var/lib/nodemesh-cluster/cni/net.d"
	NodeCNIBinDir  = "/var/lib/nodemesh-cluster/cni/bin"
)

// hostPath returns where the node path p (below /var/lib) is in Node.Dir.
func (n *Node) hostPath(p string) string {
	rel, _ := strings.CutPrefix(p, "/var/lib/")
	return filepath.Join("var-lib", rel)
}

// cniPlugins are the reference plugins the nodes' network uses.
var cniPlugins = []string{"bridge", "host-local", "loopback", "portmap"}

// linkCNIPlugins links the reference plugins from /usr/lib/cni into a
// node's CNI bin directory.
func linkCNIPlugins(dir string) error {
	for _, p := range cniPlugins {
		dst := filepath.Join(dir, p)
		if _, err := os.Lstat(dst); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join("/usr/lib/cni", p), dst); err != nil {
			return fmt.Errorf("linking the CNI plugin %s: %w", p, err)
		}
	}
	return nil
}

func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// pidGone reports whether pid has exited (gone or a zombie).
func pidGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i > 0 && i+2 < len(s) {
		return s[i+2] == 'Z'
	}
	return false
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free loopback port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func killPid(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }

// RestartContainerd stops node n's containerd (SIGTERM) and waits until
// its init has started a new one that answers, as a service manager
// would on a real node. Pods keep running (their shims outlive it).
// containerd.pid holds a pid of the node's PID namespace, so the signal
// and the checks run inside the node.
func (c *Cluster) RestartContainerd(ctx context.Context, n *Node) error {
	pidFile := filepath.Join(n.Dir, "containerd.pid")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return fmt.Errorf("node %s: reading containerd's pid: %w", n.Name, err)
	}
	old, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || old <= 1 {
		return fmt.Errorf("node %s: bad containerd pid %q", n.Name, b)
	}
	if _, err := c.NodeExec(ctx, n, "kill", "-TERM", strconv.Itoa(old)); err != nil {
		return fmt.Errorf("node %s: stopping containerd: %w", n.Name, err)
	}
	return poll(ctx, time.Minute, "containerd restarted on "+n.Name, func() (bool, string, error) {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			return false, err.Error(), nil
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		if pid == old {
			return false, "containerd not restarted yet", nil
		}
		out, err := exec.CommandContext(ctx, "ctr", "--address", n.Socket, "version").CombinedOutput()
		return err == nil, string(out), nil
	})
}

// childOf returns the one child of pid (the node's init under unshare).
func childOf(pid int) (int, error) {
	p := strconv.Itoa(pid)
	b, err := os.ReadFile("/proc/" + p + "/task/" + p + "/children")
	if err != nil {
		return 0, fmt.Errorf("reading the children of %d: %w", pid, err)
	}
	f := strings.Fields(string(b))
	if len(f) != 1 {
		return 0, fmt.Errorf("process %d has children %q, want one", pid, f)
	}
	return strconv.Atoi(f[0])
}

// NodeExec runs argv in node n's network and mount namespaces (nsenter
// into its init) and returns the combined output.
func (c *Cluster) NodeExec(ctx context.Context, n *Node, argv ...string) ([]byte, error) {
	if n.InitPid <= 0 {
		return nil, fmt.Errorf("node %s: its init is not known", n.Name)
	}
	args := append([]string{"--target", strconv.Itoa(n.InitPid), "--mount", "--net", "--pid", "--"}, argv...)
	out, err := exec.CommandContext(ctx, "nsenter", args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("node %s: %s: %w: %s", n.Name, strings.Join(argv, " "), err, out)
	}
	return out, nil
}
