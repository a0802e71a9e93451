package cluster_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/cluster"
	"github.com/nodemesh/nodemesh/lab/cluster/image"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

const systemNS = cluster.Namespace

// imagesEnv names an image archive from `make image` to install from
// (make test-cluster sets it); without it each test builds the images
// itself with the same code.
const imagesEnv = "NODEMESH_IMAGES"

// The capabilities the DaemonSet grants the agent (manifests/base/agent):
// CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21, CAP_BPF 39.
const agentCaps = 1<<12 | 1<<19 | 1<<21 | 1<<39

// installed is a cluster with nodemesh installed as a user would.
type installed struct {
	c    *cluster.Cluster
	root string // the nodemesh checkout
	// before are the BPF programs attached at the cgroup v2 root before
	// the install (other tests' may come and go; ours must go).
	before map[string]bool
}

// buildImages builds the images as `make image` does (lab/cluster/mkimage:
// the nodemesh images plus the busybox cleanup image) into dir.
func buildImages(t *testing.T, ctx context.Context, root, dir string) string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Fatalf("building the images needs the go command: %v", err)
	}
	out := filepath.Join(dir, "images.tar")
	start := time.Now()
	imgs := append(image.Nodemesh("dev"), image.Busybox())
	if err := image.Build(ctx, root, out, imgs, testWriter{t}); err != nil {
		t.Fatalf("building the images: %v", err)
	}
	t.Logf("images built in %s", time.Since(start).Round(time.Millisecond))
	return out
}

// upInstalled brings up a cluster of nodes nodes with the images imported
// into every node's containerd, applies the cluster overlay with kubectl
// and waits until the CA Deployment and the agent DaemonSet are rolled out
// through the real controllers. The cluster is swept when the test ends.
func upInstalled(t *testing.T, ctx context.Context, nodes int) *installed {
	t.Helper()
	privtest.Root(t)
	sweepStale(t)
	root := cluster.ModuleRoot()
	if root == "" {
		t.Fatal("the nodemesh source is not next to this test")
	}
	bins, err := cluster.BinDir(ctx)
	if err != nil {
		t.Fatal(err)
	}
	archive := os.Getenv(imagesEnv)
	if archive == "" {
		archive = buildImages(t, ctx, root, t.TempDir())
	} else {
		t.Logf("images from %s=%s (make image)", imagesEnv, archive)
	}
	id := newID()
	dir := cluster.DefaultStateDir(id)
	start := time.Now()
	c, err := cluster.Up(ctx, cluster.Options{ID: id, Nodes: nodes, BinDir: bins, Images: archive,
		Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatalf("cluster up: %v", err)
	}
	t.Logf("cluster %s up with %d nodes and the images imported in %s", id, nodes, time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			dumpState(t, c)
			keepLogs(t, dir)
		}
		if err := cluster.Sweep(context.Background(), id, dir); err != nil {
			t.Errorf("cluster sweep: %v", err)
		}
		if left, err := cluster.Leftovers(id, dir); err != nil || len(left) > 0 {
			t.Errorf("cluster %s left %v (%v)", id, left, err)
		}
	})
	in := &installed{c: c, root: root, before: rootProgs(t)}
	start = time.Now()
	if err := c.Install(ctx, filepath.Join(root, "manifests", "overlays", "cluster"), testWriter{t}); err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply -k manifests/overlays/cluster: CA and agents Ready after %s", time.Since(start).Round(time.Millisecond))
	return in
}

// dumpState logs what kubectl knows, for a failed test.
func dumpState(t *testing.T, c *cluster.Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, args := range [][]string{
		{"get", "pods", "-A", "-o", "wide"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
	} {
		out, _ := c.Kubectl(ctx, args...).CombinedOutput()
		t.Logf("kubectl %s:\n%s", strings.Join(args, " "), out)
	}
	out, _ := c.Kubectl(ctx, "-n", systemNS, "logs", "--tail=60", "-l", "app.kubernetes.io/name=nodemesh-agent", "--all-containers", "--prefix").CombinedOutput()
	t.Logf("agent logs:\n%s", out)
}

// agentLogs logs the agents' logs without the access log lines, while the
// agents still run.
func agentLogs(t *testing.T, c *cluster.Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, _ := c.Kubectl(ctx, "-n", systemNS, "logs", "--tail=-1", "-l", "app.kubernetes.io/name=nodemesh-agent", "--all-containers", "--prefix").CombinedOutput()
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if !strings.Contains(l, `"msg":"connection"`) {
			keep = append(keep, l)
		}
	}
	t.Logf("agent logs before the uninstall:\n%s", strings.Join(keep, "\n"))
}

// rootProgs returns the IDs of the BPF programs attached at the cgroup v2
// root, where the agents attach capture.
func rootProgs(t *testing.T) map[string]bool {
	t.Helper()
	cg2, err := cgroup.Mount()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("bpftool", "-j", "cgroup", "show", cg2).Output()
	if err != nil {
		t.Fatalf("bpftool cgroup show %s: %v", cg2, err)
	}
	var progs []struct {
		ID   int    `json:"id"`
		Name string `json:"name"`
	}
	if s := strings.TrimSpace(string(out)); s != "" {
		if err := json.Unmarshal([]byte(s), &progs); err != nil {
			t.Fatalf("bpftool cgroup show: %v: %s", err, out)
		}
	}
	ids := map[string]bool{}
	for _, p := range progs {
		ids[strconv.Itoa(p.ID)+" "+p.Name] = true
	}
	return ids
}

// agentPods returns the agent pods by node name.
func (in *installed) agentPods(t *testing.T, ctx context.Context) map[string]corev1.Pod {
	t.Helper()
	pods, err := in.c.Server.Client.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=nodemesh-agent"})
	if err != nil {
		t.Fatal(err)
	}
	byNode := map[string]corev1.Pod{}
	for _, p := range pods.Items {
		byNode[p.Spec.NodeName] = p
	}
	return byNode
}

// checkAgentProcesses checks, in the kernel, what the agent containers got:
// exactly the manifest's capabilities, not privileged, in the pod's cgroup
// kubelet made under the node's cgroup root.
func (in *installed) checkAgentProcesses(t *testing.T, ctx context.Context) {
	t.Helper()
	pods := in.agentPods(t, ctx)
	for _, n := range in.c.Nodes {
		p, ok := pods[n.Name]
		if !ok {
			t.Errorf("node %s has no agent pod", n.Name)
			continue
		}
		if sc := p.Spec.Containers[0].SecurityContext; sc == nil || sc.Privileged == nil || *sc.Privileged {
			t.Errorf("node %s: agent container privileged (%v)", n.Name, sc)
		}
		pids := procsOfPod(t, string(p.UID), "nodemesh-agent")
		if len(pids) != 1 {
			t.Errorf("node %s: %d nodemesh-agent processes of pod %s, want 1", n.Name, len(pids), p.UID)
			continue
		}
		st, err := os.ReadFile("/proc/" + strconv.Itoa(pids[0]) + "/status")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
				eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
				if err != nil {
					t.Fatal(err)
				}
				if eff != agentCaps {
					t.Errorf("node %s: agent CapEff %#x, want %#x (BPF, NET_ADMIN, SYS_ADMIN, SYS_PTRACE)", n.Name, eff, uint64(agentCaps))
				}
			}
		}
		cg, _ := os.ReadFile("/proc/" + strconv.Itoa(pids[0]) + "/cgroup")
		if !strings.Contains(string(cg), "/nm-"+in.c.ID+"/"+n.Name+"/kubepods") {
			t.Errorf("node %s: agent process not in kubelet's pod cgroups under the node's root:\n%s", n.Name, cg)
		}
		t.Logf("node %s: agent pid %d, CapEff %#x, not privileged", n.Name, pids[0], uint64(agentCaps))
		// The agent names the holder of its node mark after --node-name,
		// not after its hostname: the node's, which differs here as under
		// kubelet's --hostname-override.
		var holder string
		if err := poll(ctx, 30*time.Second, func() (bool, string) {
			l, err := in.c.Server.Client.CoordinationV1().Leases(systemNS).Get(ctx, rollout.LeaseName(n.Name), metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			holder = ptr.Deref(l.Spec.HolderIdentity, "")
			return holder != "", "no holder in the node mark"
		}); err != nil {
			t.Errorf("node %s: %v", n.Name, err)
		} else if holder != n.Name {
			t.Errorf("node %s (hostname %s): node mark %s names holder %q, want the node name", n.Name, in.c.Hostname(n), rollout.LeaseName(n.Name), holder)
		}
	}
}

// procsOfPod lists the processes named comm whose cgroup path carries the
// pod UID, as the agent's --pod-netns=proc looks for them.
func procsOfPod(t *testing.T, uid, comm string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	want := strings.ReplaceAll(uid, "-", "_")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		c, err := os.ReadFile("/proc/" + e.Name() + "/comm")
		if err != nil || strings.TrimSpace(string(c)) != comm {
			continue
		}
		cg, err := os.ReadFile("/proc/" + e.Name() + "/cgroup")
		if err != nil {
			continue
		}
		if strings.Contains(string(cg), "pod"+uid) || strings.Contains(string(cg), "pod"+want) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// uninstall deletes the install and runs the node cleanup, as
// docs/install.md says, and checks that nothing of the agents is left on
// the nodes: no pins, no programs at the cgroup root, no agent process.
func (in *installed) uninstall(t *testing.T, ctx context.Context) {
	t.Helper()
	// The agents pinned capture on their node's bpffs; the cleanup must
	// remove it.
	for _, n := range in.c.Nodes {
		if out, err := in.c.NodeExec(ctx, n, "ls", "/sys/fs/bpf/nodemesh"); err != nil || len(strings.Fields(string(out))) == 0 {
			t.Errorf("node %s: no agent pins before uninstall: %q (%v)", n.Name, out, err)
		}
	}
	if len(rootProgs(t)) == len(in.before) {
		t.Error("no program of the agents attached at the cgroup v2 root before uninstall")
	}
	// The agents installed the CNI plugin on their node: binary, conflist
	// entry, socket, namespace table.
	for _, n := range in.c.Nodes {
		if left := cniLeft(t, n); len(left) != 4 {
			t.Errorf("node %s: the CNI install is incomplete before uninstall: %v", n.Name, left)
		}
	}
	start := time.Now()
	overlay := filepath.Join(in.root, "manifests", "overlays", "cluster")
	un := filepath.Join(overlay, "uninstall")
	// docs/install.md, "Uninstalling", step by step.
	kubectl(t, in.c, "", "label", "namespace", "--all", "nodemesh.io/mode-")
	kubectl(t, in.c, "", "-n", systemNS, "delete", "daemonset", "nodemesh-agent", "--wait=true", "--timeout=3m")
	kubectl(t, in.c, "", "apply", "-k", un)
	kubectl(t, in.c, "", "-n", systemNS, "rollout", "status", "daemonset/nodemesh-node-cleanup", "--timeout=3m")
	kubectl(t, in.c, "", "delete", "-k", un, "--wait=true", "--timeout=3m")
	kubectl(t, in.c, "", "delete", "-k", overlay, "--wait=true", "--timeout=3m", "--ignore-not-found")
	t.Logf("uninstalled (delete, node cleanup) in %s", time.Since(start).Round(time.Millisecond))
	for _, n := range in.c.Nodes {
		out, err := in.c.NodeExec(ctx, n, "ls", "-A", "/sys/fs/bpf")
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range strings.Fields(string(out)) {
			// The kernel's bpf_preload puts these two iterators into every
			// bpffs instance.
			if f != "maps.debug" && f != "progs.debug" {
				t.Errorf("node %s: /sys/fs/bpf/%s left after uninstall", n.Name, f)
			}
		}
	}
	err := poll(ctx, 30*time.Second, func() (bool, string) {
		var left []string
		for p := range rootProgs(t) {
			if !in.before[p] {
				left = append(left, p)
			}
		}
		slices.Sort(left)
		return len(left) == 0, fmt.Sprintf("programs still attached at the cgroup v2 root: %v", left)
	})
	if err != nil {
		t.Error(err)
	}
	if pids := procsByComm(t, "nodemesh-agent", in.c.ID); len(pids) > 0 {
		t.Errorf("agent processes left: %v", pids)
	}
	for _, n := range in.c.Nodes {
		if left := cniLeft(t, n); len(left) > 0 {
			t.Errorf("node %s: CNI install left after uninstall: %v", n.Name, left)
		}
	}
}

// cniLeft lists what of the agent's CNI install is on node n: the plugin
// binary, its entry in the node's network configuration, the socket.
func cniLeft(t *testing.T, n *cluster.Node) []string {
	t.Helper()
	var left []string
	host := func(p string) string { return filepath.Join(n.Dir, "var-lib", strings.TrimPrefix(p, "/var/lib/")) }
	if _, err := os.Stat(filepath.Join(host(cluster.NodeCNIBinDir), "nodemesh-cni")); err == nil {
		left = append(left, "plugin binary")
	}
	b, err := os.ReadFile(filepath.Join(host(cluster.NodeCNIConfDir), "10-nodemesh.conflist"))
	if err != nil {
		t.Errorf("node %s: reading its network configuration: %v", n.Name, err)
	} else if strings.Contains(string(b), `"nodemesh-cni"`) {
		left = append(left, "conflist entry")
	}
	if _, err := os.Stat(filepath.Join(n.Dir, "run", "nodemesh", "cni.sock")); err == nil {
		left = append(left, "socket")
	}
	if _, err := os.Stat(filepath.Join(n.Dir, "run", "nodemesh", "namespaces.json")); err == nil {
		left = append(left, "namespace table")
	}
	return left
}

// procsByComm lists the processes named comm in cluster id's cgroups.
func procsByComm(t *testing.T, comm, id string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range ents {
		c, err := os.ReadFile("/proc/" + e.Name() + "/comm")
		if err != nil || strings.TrimSpace(string(c)) != comm {
			continue
		}
		f, err := os.Open("/proc/" + e.Name() + "/cgroup")
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "/nm-"+id+"/") {
				pid, _ := strconv.Atoi(e.Name())
				pids = append(pids, pid)
				break
			}
		}
		f.Close()
	}
	return pids
}

// poll calls check until it is done or timeout passes; the error carries
// check's last message.
func poll(ctx context.Context, timeout time.Duration, check func() (bool, string)) error {
	deadline := time.Now().Add(timeout)
	for {
		done, msg := check()
		if done {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("not after %s: %s", timeout, msg)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
