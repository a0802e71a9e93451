// Package cluster brings up a small real Kubernetes cluster on one Linux
// machine for the cluster test tier: the lab's
// API server and etcd, the upstream kube-controller-manager and
// kube-scheduler, and nodes that each run a real kubelet, containerd (with
// the reference CNI plugins) and kube-proxy, built from the Kubernetes Go
// modules (lab/kube-node).
//
// A node is what kind makes of a container, made of namespaces instead: a
// network namespace on the cluster's underlay bridge, a mount namespace of
// its own (private /run, /var/lib, /var/log and bpffs, so containerd's and
// kubelet's state, pod network namespaces and BPF pins stay inside and
// vanish with the node), and a cgroup sub-tree (kubelet's cgroup root) in
// every hierarchy. Nodes share the kernel, so the nodemesh agents of all
// nodes attach to the one cgroup v2 root, as they would on kind.
//
// Everything a cluster creates is named with the lab's prefix and the
// cluster's ID (nm-<id>...) and is removed by Down, also after the creating
// process was killed (Sweep).
package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/netns"
)

// ClusterCIDR is the pods' address range; the controller manager gives each
// node a /24 of it.
const ClusterCIDR = "10.244.0.0/16"

// DefaultStateDir returns the state directory of the cluster with id. It is
// outside /run and /var/lib, which every node mounts privately.
func DefaultStateDir(id string) string { return "/var/tmp/nodemesh-" + id }

// Options configure Up.
type Options struct {
	// ID names everything the cluster creates (nm-<id>...): 1-6 lower-case
	// letters or digits. Required.
	ID string
	// StateDir holds configuration, logs and the nodes' private
	// directories. Default DefaultStateDir(ID).
	StateDir string
	// Nodes is the number of worker nodes; default 2.
	Nodes int
	// BinDir holds the programs in Binaries; "" means BinDir(ctx).
	BinDir string
	// APIServerBinary is the kube-apiserver; "" means apiserver.Binary.
	APIServerBinary string
	// Images is an image archive (image.Build) imported into every node's
	// containerd before its kubelet starts; optional.
	Images string
	// Detach leaves the API server running after the calling process
	// exits (nodemeshctl cluster up); Down or Sweep ends it. The nodes and
	// controllers always outlive a killed caller until Sweep.
	Detach bool
	// Owner is the process whose exit makes the cluster stale, for the
	// tests' sweep of clusters left by killed test processes (the creator
	// file). 0 means the calling process, or, with Detach, none: then only
	// Down or Sweep ends it.
	Owner int
	// Log receives progress; nil discards it.
	Log *slog.Logger
}

// Node is one worker node.
type Node struct {
	Name    string // Kubernetes node name
	IP      string // underlay address (the node's InternalIP)
	PodCIDR string // assigned by the controller manager
	Netns   string // path of the node's network namespace
	Dir     string // the node's state directory
	// Cgroup is the node's directory in the cgroup v2 hierarchy; kubelet's
	// cgroup root has the same path in every v1 hierarchy.
	Cgroup string
	// Socket is containerd's socket as seen from outside the node.
	Socket string
	// InitPid is the node's init (host PID): PID 1 of the node's PID
	// namespace; its namespaces are the node's.
	InitPid int

	link string // host side of the node's veth
	init *exec.Cmd
}

// Cluster is a running cluster.
type Cluster struct {
	ID     string
	Dir    string
	Server *apiserver.Server
	Nodes  []*Node
	// BinDir holds kubectl and the other node programs.
	BinDir string
	// HostIP is the host's address on the underlay; the API server listens
	// there.
	HostIP string

	prefix   string
	underlay netip.Prefix
	cgroup   string // the cluster's cgroup v2 directory
	log      *slog.Logger
	procs    []*exec.Cmd
	tokens   map[string]string // bearer token by user
	// loaded: attached by Load, so this process started none of it.
	loaded bool
}

// Kubeconfig is the admin kubeconfig.
func (c *Cluster) Kubeconfig() string { return c.Server.Kubeconfig }

// Kubectl returns a kubectl command with the admin kubeconfig.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECTL_KUBERC=false")
	return cmd
}

// Up brings a cluster up. On error everything built so far is removed.
func Up(ctx context.Context, opts Options) (_ *Cluster, err error) {
	if os.Geteuid() != 0 {
		return nil, lab.ErrNotRoot
	}
	if !lab.ValidID(opts.ID) {
		return nil, fmt.Errorf("cluster ID %q: want 1-6 lower-case letters or digits", opts.ID)
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir(opts.ID)
	}
	if opts.Nodes == 0 {
		opts.Nodes = 2
	}
	if opts.Nodes < 1 || opts.Nodes > 9 {
		return nil, fmt.Errorf("cluster: %d nodes: want 1 to 9", opts.Nodes)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	for _, p := range []string{"containerd", "runc", "ctr", "nft", "unshare", "nsenter", "etcd"} {
		if _, err := exec.LookPath(p); err != nil {
			return nil, fmt.Errorf("finding %s (apt-get install containerd runc containernetworking-plugins nftables util-linux etcd-server): %w", p, err)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		return nil, fmt.Errorf("the CNI plugins are missing (apt-get install containernetworking-plugins): %w", err)
	}
	if opts.BinDir == "" {
		if opts.BinDir, err = BinDir(ctx); err != nil {
			return nil, err
		}
	}
	// Leftovers of an earlier cluster with this ID and state directory.
	if err := Sweep(ctx, opts.ID, opts.StateDir); err != nil {
		return nil, fmt.Errorf("sweeping an earlier cluster %s: %w", opts.ID, err)
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", opts.StateDir, err)
	}
	// The creator's pid tells test runs whether a cluster's creator died
	// (then it is swept); a detached cluster has no creator to wait for.
	creator := strconv.Itoa(os.Getpid())
	switch {
	case opts.Owner > 0:
		creator = strconv.Itoa(opts.Owner)
	case opts.Detach:
		creator = "detached"
	}
	if err := os.WriteFile(filepath.Join(opts.StateDir, "creator"), []byte(creator), 0o600); err != nil {
		return nil, fmt.Errorf("recording the creator: %w", err)
	}
	cg2, err := cgroup.Mount()
	if err != nil {
		return nil, err
	}
	c := &Cluster{
		ID: opts.ID, Dir: opts.StateDir, BinDir: opts.BinDir, log: log,
		prefix: lab.Prefix + opts.ID, cgroup: filepath.Join(cg2, lab.Prefix+opts.ID),
	}
	start := time.Now()
	defer func() {
		if err != nil {
			dctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if derr := c.Down(dctx); derr != nil {
				err = errors.Join(err, fmt.Errorf("removing the half-built cluster: %w", derr))
			}
		}
	}()
	if c.underlay, err = pickUnderlay(ctx, opts.ID); err != nil {
		return nil, err
	}
	c.HostIP = c.underlay.Addr().Next().String()
	if err := c.setupBridge(ctx); err != nil {
		return nil, err
	}
	if err := cgroup.Create(filepath.Join(c.cgroup, "control")); err != nil {
		return nil, err
	}
	tokens := map[string]string{}
	c.tokens = tokens
	var toks []apiserver.Token
	tok := func(user string, groups ...string) string {
		t := randHex(24)
		toks = append(toks, apiserver.Token{Token: t, User: user, Groups: groups})
		tokens[user] = t
		return t
	}
	tok("system:kube-controller-manager")
	tok("system:kube-scheduler")
	tok("system:kube-proxy")
	for i := 1; i <= opts.Nodes; i++ {
		tok("system:node:"+nodeName(i), "system:nodes")
	}
	c.Server, err = apiserver.Start(ctx, apiserver.Config{
		Dir: filepath.Join(c.Dir, "apiserver"), Binary: opts.APIServerBinary,
		BindAddress: c.HostIP, Tokens: toks, Detach: opts.Detach,
		Log: slogWriter{log},
	})
	if err != nil {
		return nil, err
	}
	log.Info("API server up", "url", c.Server.URL, "after", time.Since(start).Round(time.Millisecond))
	if err := c.startControllers(tokens); err != nil {
		return nil, err
	}
	for i := 1; i <= opts.Nodes; i++ {
		n := c.newNode(i)
		c.Nodes = append(c.Nodes, n)
		if err := c.setupNode(ctx, n, opts, tokens["system:node:"+n.Name]); err != nil {
			return nil, err
		}
	}
	if err := c.waitPodCIDRs(ctx); err != nil {
		return nil, err
	}
	if err := c.routeNodes(ctx); err != nil {
		return nil, err
	}
	if err := c.waitNodesReady(ctx); err != nil {
		return nil, err
	}
	if err := c.save(); err != nil {
		return nil, err
	}
	log.Info("cluster up", "id", c.ID, "nodes", len(c.Nodes), "after", time.Since(start).Round(time.Millisecond))
	return c, nil
}

func nodeName(i int) string { return "node" + strconv.Itoa(i) }

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// pickUnderlay chooses a /24 in 100.64.0.0/10 (shared address space, never
// routed on the Internet) from the ID, skipping ranges the host already
// routes (another cluster).
func pickUnderlay(ctx context.Context, id string) (netip.Prefix, error) {
	h := fnv.New32a()
	h.Write([]byte(id))
	start := h.Sum32() % 16384
	for i := uint32(0); i < 64; i++ {
		v := (start + i) % 16384
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, byte(64 + v>>8), byte(v), 0}), 24)
		out, err := exec.CommandContext(ctx, "ip", "-4", "route", "show", "to", "match", p.Addr().Next().String()).Output()
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("reading the host's routes: %w", err)
		}
		taken := false
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if line != "" && !strings.HasPrefix(line, "default") {
				taken = true // a route more specific than the default covers it
			}
		}
		if !taken {
			return p, nil
		}
	}
	return netip.Prefix{}, errors.New("no free /24 in 100.64.0.0/10 for the cluster's underlay")
}

// setupBridge creates the underlay bridge with the host's address on it:
// the API server listens there, for kubelets and (through the kubernetes
// Service) pods. Nodes have no default route, so nothing of the cluster
// reaches the host's other networks.
func (c *Cluster) setupBridge(ctx context.Context) error {
	br := c.prefix + "-br"
	if err := netns.IP(ctx, "", []string{
		"link add " + br + " type bridge",
		"link set dev " + br + " addrgenmode none",
		"addr add " + c.HostIP + "/" + strconv.Itoa(c.underlay.Bits()) + " dev " + br,
		"link set dev " + br + " up",
	}); err != nil {
		return fmt.Errorf("creating the underlay bridge: %w", err)
	}
	_ = netns.IP(ctx, "", []string{"link set dev " + br + " type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0"})
	return nil
}

// startControllers runs kube-controller-manager and kube-scheduler on the
// host, in the cluster's control cgroup.
func (c *Cluster) startControllers(tokens map[string]string) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	dir := filepath.Join(c.Dir, "control")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	kcm := filepath.Join(dir, "kube-controller-manager.kubeconfig")
	if err := c.writeKubeconfig(kcm, tokens["system:kube-controller-manager"]); err != nil {
		return err
	}
	sched := filepath.Join(dir, "kube-scheduler.kubeconfig")
	if err := c.writeKubeconfig(sched, tokens["system:kube-scheduler"]); err != nil {
		return err
	}
	sd := c.Server.Dir
	if err := c.spawnHost("kube-controller-manager",
		"--kubeconfig", kcm,
		"--authentication-kubeconfig", kcm, "--authorization-kubeconfig", kcm,
		"--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(ports[0]),
		"--leader-elect=false",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file", filepath.Join(sd, "sa.key"),
		"--root-ca-file", filepath.Join(sd, "ca.crt"),
		"--allocate-node-cidrs=true", "--cluster-cidr", ClusterCIDR, "--node-cidr-mask-size", "24",
		"--service-cluster-ip-range", c.Server.ServiceCIDR,
		"--controllers", "*,-bootstrapsigner,-tokencleaner,-csrsigning,-csrapproving,-csrcleaner",
		"--node-monitor-grace-period", "20s",
		"--v", "1",
	); err != nil {
		return err
	}
	return c.spawnHost("kube-scheduler",
		"--kubeconfig", sched,
		"--authentication-kubeconfig", sched, "--authorization-kubeconfig", sched,
		"--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(ports[1]),
		"--leader-elect=false",
		"--v", "1",
	)
}

func (c *Cluster) writeKubeconfig(path, token string) error {
	ca, err := os.ReadFile(c.Server.CAFile)
	if err != nil {
		return fmt.Errorf("reading the cluster CA: %w", err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["nodemesh"] = &clientcmdapi.Cluster{Server: c.Server.URL, CertificateAuthorityData: ca}
	cfg.AuthInfos["user"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["nodemesh"] = &clientcmdapi.Context{Cluster: "nodemesh", AuthInfo: "user"}
	cfg.CurrentContext = "nodemesh"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// spawnHost starts a control-plane program on the host, born into the
// cluster's control cgroup, logging to <dir>/control/<name>.log.
func (c *Cluster) spawnHost(name string, args ...string) error {
	logf, err := os.OpenFile(filepath.Join(c.Dir, "control", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("opening the %s log: %w", name, err)
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(c.BinDir, name), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := startIn(cmd, "", filepath.Join(c.cgroup, "control")); err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	c.procs = append(c.procs, cmd)
	return nil
}

// startIn starts cmd in network namespace nsPath ("" = this one), born
// into the cgroup v2 directory cg, in a session of its own. It outlives
// the caller if that is killed (a Go thread that forked a child may exit,
// so Pdeathsig cannot be relied on); the cgroup is what Sweep kills.
func startIn(cmd *exec.Cmd, nsPath, cg string) error {
	fd, err := unix.Open(cg, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening cgroup %s: %w", cg, err)
	}
	defer unix.Close(fd)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd, Setsid: true}
	if nsPath == "" {
		return cmd.Start()
	}
	return netns.Start(nsPath, cmd)
}

// waitPodCIDRs waits until the controller manager has given every node a
// pod CIDR, and writes each node's CNI configuration with it.
func (c *Cluster) waitPodCIDRs(ctx context.Context) error {
	return poll(ctx, 2*time.Minute, "nodes registered with a pod CIDR", func() (bool, string, error) {
		missing := []string{}
		for _, n := range c.Nodes {
			if n.PodCIDR != "" {
				continue
			}
			kn, err := c.Server.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil || kn.Spec.PodCIDR == "" {
				missing = append(missing, n.Name)
				continue
			}
			n.PodCIDR = kn.Spec.PodCIDR
			if err := writeCNI(n); err != nil {
				return false, "", err
			}
		}
		return len(missing) == 0, "waiting for " + strings.Join(missing, ", ") + c.nodeLogHint(), nil
	})
}

func (c *Cluster) nodeLogHint() string {
	if len(c.Nodes) == 0 {
		return ""
	}
	return "; kubelet log " + filepath.Join(c.Nodes[0].Dir, "kubelet.log") + " ends with:\n" + logTail(filepath.Join(c.Nodes[0].Dir, "kubelet.log"), 1500)
}

// routeNodes gives every node a route to every other node's pods (the
// underlay is one L2 segment, so plain next hops do).
func (c *Cluster) routeNodes(ctx context.Context) error {
	for _, n := range c.Nodes {
		var lines []string
		for _, o := range c.Nodes {
			if o != n {
				lines = append(lines, "route replace "+o.PodCIDR+" via "+o.IP+" dev eth0")
			}
		}
		if err := netns.IP(ctx, filepath.Base(n.Netns), lines); err != nil {
			return fmt.Errorf("routing node %s: %w", n.Name, err)
		}
		// Pods reach the API server (the kubernetes Service's endpoint on
		// the host) from the node's address: the host has no routes to pods.
		rules := fmt.Sprintf("table ip %s {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"eth0\" ip saddr %s ip daddr != %s masquerade\n }\n}\n", c.prefix, n.PodCIDR, ClusterCIDR)
		if _, err := netns.Run(ctx, n.Netns, []byte(rules), "nft", "-f", "-"); err != nil {
			return fmt.Errorf("node %s: masquerading pods towards the host: %w", n.Name, err)
		}
	}
	return nil
}

// waitNodesReady waits until every node's kubelet reports Ready.
func (c *Cluster) waitNodesReady(ctx context.Context) error {
	return poll(ctx, 3*time.Minute, "nodes Ready", func() (bool, string, error) {
		var notReady []string
		for _, n := range c.Nodes {
			kn, err := c.Server.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil || !nodeReady(kn) {
				msg := n.Name
				if err == nil {
					for _, cond := range kn.Status.Conditions {
						if cond.Type == corev1.NodeReady {
							msg += " (" + cond.Reason + ": " + cond.Message + ")"
						}
					}
				}
				notReady = append(notReady, msg)
			}
		}
		return len(notReady) == 0, "not Ready: " + strings.Join(notReady, ", ") + c.nodeLogHint(), nil
	})
}

func nodeReady(n *corev1.Node) bool {
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

// poll calls check until it reports done, it fails, ctx ends or timeout
// passes; the error then carries check's last progress message.
func poll(ctx context.Context, timeout time.Duration, what string, check func() (bool, string, error)) error {
	deadline := time.Now().Add(timeout)
	var last string
	for delay := 50 * time.Millisecond; ; delay = min(delay*2, time.Second) {
		done, msg, err := check()
		if err != nil {
			return err
		}
		if done {
			return nil
		}
		last = msg
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after %s: %s", what, timeout, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (%s)", what, ctx.Err(), last)
		case <-time.After(delay):
		}
	}
}

// state is what Load needs to attach to a detached cluster.
type state struct {
	ID       string  `json:"id"`
	HostIP   string  `json:"hostIP"`
	Underlay string  `json:"underlay"`
	BinDir   string  `json:"binDir"`
	Nodes    []*Node `json:"nodes"`
}

func (c *Cluster) save() error {
	b, err := json.MarshalIndent(state{ID: c.ID, HostIP: c.HostIP, Underlay: c.underlay.String(), BinDir: c.BinDir, Nodes: c.Nodes}, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the cluster state: %w", err)
	}
	if err := os.WriteFile(filepath.Join(c.Dir, "cluster.json"), b, 0o600); err != nil {
		return fmt.Errorf("writing the cluster state: %w", err)
	}
	return nil
}

// Load attaches to a cluster started (detached) by another process.
func Load(stateDir string) (*Cluster, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, "cluster.json"))
	if err != nil {
		return nil, fmt.Errorf("reading the cluster state in %s (is the cluster up?): %w", stateDir, err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decoding %s/cluster.json: %w", stateDir, err)
	}
	srv, err := apiserver.Load(filepath.Join(stateDir, "apiserver"))
	if err != nil {
		return nil, err
	}
	under, err := netip.ParsePrefix(st.Underlay)
	if err != nil {
		return nil, fmt.Errorf("cluster state: underlay: %w", err)
	}
	cg2, err := cgroup.Mount()
	if err != nil {
		return nil, err
	}
	return &Cluster{
		ID: st.ID, Dir: stateDir, Server: srv, Nodes: st.Nodes, BinDir: st.BinDir, HostIP: st.HostIP,
		prefix: lab.Prefix + st.ID, underlay: under, cgroup: filepath.Join(cg2, lab.Prefix+st.ID),
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), loaded: true,
	}, nil
}

// Down stops the cluster and removes everything it created.
func (c *Cluster) Down(ctx context.Context) error {
	var errs []error
	// Nodes first: the init's SIGTERM stops kubelet and kube-proxy, then
	// containerd; Sweep kills what is left (shims, containers).
	// The signal goes to the node's init itself: unshare, its parent,
	// does not pass it on, and kills the init when it dies.
	for _, n := range c.Nodes {
		if n.init != nil && n.init.Process != nil && n.InitPid > 0 {
			_ = syscall.Kill(n.InitPid, syscall.SIGTERM)
		}
	}
	for _, n := range c.Nodes {
		if n.init != nil && n.init.Process != nil {
			waitOrKill(n.init, 20*time.Second)
		}
	}
	for _, p := range c.procs {
		if p.Process != nil {
			_ = p.Process.Signal(syscall.SIGTERM)
			waitOrKill(p, 10*time.Second)
		}
	}
	// A loaded server has no processes of ours to stop, and Stop would
	// remove the pid files Sweep kills it by.
	if c.Server != nil && !c.loaded {
		if err := c.Server.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := Sweep(ctx, c.ID, c.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func waitOrKill(cmd *exec.Cmd, grace time.Duration) {
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(grace):
		_ = cmd.Process.Kill()
		<-done
	}
}

type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(b []byte) (int, error) {
	w.l.Info(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return string(tail(b, n))
}

// Bridge is the name of the cluster's underlay bridge (host side), where
// a capture sees every packet between nodes.
func (c *Cluster) Bridge() string { return c.prefix + "-br" }
