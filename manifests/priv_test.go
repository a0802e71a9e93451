package manifests_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"

	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/redirect"
)

// privPrefix names the cgroups, network namespaces and pins of these tests.
const privPrefix = "nmtmanifests-"

// node is a fake node for the agent helper: a cgroup tree laid out as
// kubelet's cgroupfs driver does, a pod (a process running as the pause
// container's uid 65535 in its own network namespace) and a pin directory.
type node struct {
	base, pods, agent, podCgroup string
	netns, netnsPath             string
	uid                          string
	pinDir                       string
	ip                           netip.Addr
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// sweep removes what a killed earlier run of these tests left behind.
func sweep(t *testing.T, h nodeinfo.Hierarchy) {
	t.Helper()
	ents, _ := os.ReadDir(h.Path)
	for _, e := range ents {
		if e.IsDir() && strings.HasPrefix(e.Name(), privPrefix) {
			removeCgroups(t, filepath.Join(h.Path, e.Name()))
		}
	}
	ents, _ = os.ReadDir("/var/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), privPrefix) {
			_ = exec.Command("ip", "netns", "del", e.Name()).Run()
		}
	}
	ents, _ = os.ReadDir("/sys/fs/bpf")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), privPrefix) {
			_ = os.RemoveAll(filepath.Join("/sys/fs/bpf", e.Name()))
		}
	}
}

func removeCgroups(t *testing.T, root string) {
	t.Helper()
	var dirs []string
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for _, d := range dirs {
		b, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := os.Remove(dirs[i])
			if err == nil || errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func newNode(t *testing.T) *node {
	t.Helper()
	privtest.Root(t)
	h, err := nodeinfo.DiscoverHierarchy("")
	if err != nil {
		t.Fatal(err)
	}
	sweep(t, h)
	id := fmt.Sprintf("%s%d", privPrefix, os.Getpid())
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	x := hex.EncodeToString(b)
	n := &node{
		base:   filepath.Join(h.Path, id),
		netns:  id + "-pod",
		uid:    x[:8] + "-" + x[8:12] + "-" + x[12:16] + "-" + x[16:20] + "-" + x[20:],
		pinDir: filepath.Join("/sys/fs/bpf", id),
		ip:     netip.MustParseAddr("10.213.0.2"),
	}
	n.pods = filepath.Join(n.base, "kubepods")
	n.agent = filepath.Join(n.base, "agent")
	n.podCgroup = filepath.Join(n.pods, "besteffort", "pod"+n.uid)
	n.netnsPath = "/var/run/netns/" + n.netns
	t.Cleanup(func() {
		removeCgroups(t, n.base)
		_ = exec.Command("ip", "netns", "del", n.netns).Run()
		_ = os.RemoveAll(n.pinDir)
	})
	ctr := filepath.Join(n.podCgroup, strings.Repeat("ef", 32))
	for _, d := range []string{ctr, n.agent} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run(t, "ip", "netns", "add", n.netns)
	// No dummy driver everywhere: a veth pair with both ends in the pod.
	run(t, "ip", "-n", n.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	run(t, "ip", "-n", n.netns, "addr", "add", n.ip.String()+"/24", "dev", "eth0")
	run(t, "ip", "-n", n.netns, "link", "set", "eth0", "up")
	run(t, "ip", "-n", n.netns, "link", "set", "lo", "up")

	// The pause process: another user, as real pause containers are, so
	// reading its netns link needs CAP_SYS_PTRACE.
	fd, err := unix.Open(ctr, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	pause := exec.Command("ip", "netns", "exec", n.netns, "setpriv", "--reuid=65535", "--regid=65535", "--clear-groups", "sleep", "600")
	pause.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd, Pdeathsig: syscall.SIGKILL}
	if err := pause.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pause.Process.Kill(); _ = pause.Wait() })
	// Wait until setpriv has exec'd sleep as 65535 in the pod's netns.
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := os.Stat(fmt.Sprintf("/proc/%d", pause.Process.Pid))
		if err == nil && st.Sys().(*syscall.Stat_t).Uid == 65535 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pause stand-in did not start as uid 65535")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return n
}

// agentCaps returns the capabilities the rendered agent DaemonSet adds.
func agentCaps(t *testing.T) []string {
	t.Helper()
	ds := get[*appsv1.DaemonSet](t, render(t, "."), "DaemonSet", ns, "nodemesh-agent")
	var caps []string
	for _, c := range ds.Spec.Template.Spec.Containers[0].SecurityContext.Capabilities.Add {
		caps = append(caps, strings.ToLower(string(c)))
	}
	return caps
}

// agentResult is what the agent helper reports.
type agentResult struct {
	Preflight string // Report.Err, "" when it passed
	FindErr   string
	Sandbox   nodeinfo.Sandbox
	LoadErr   string
	Cookie    uint64
	// Transparent inbound delivery set up and proved in the pod with
	// these capabilities (issue 14, item 7), or why not.
	SourcePreserved bool
	SourceReason    string
}

// runAgent runs the agent helper as root with exactly caps, in the agent
// cgroup.
func runAgent(t *testing.T, n *node, caps []string) agentResult {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bounding := "-all"
	for _, c := range caps {
		bounding += ",+" + c
	}
	fd, err := unix.Open(n.agent, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	cmd := exec.Command("setpriv", "--bounding-set", bounding, "--inh-caps", "-all", self)
	cmd.Env = append(os.Environ(), helperEnv+"=agent",
		"NMT_UID="+n.uid, "NMT_PODS="+n.pods, "NMT_AGENT="+n.agent, "NMT_PINS="+n.pinDir, "NMT_IP="+n.ip.String(),
		fmt.Sprintf("NMT_NODENS=/proc/%d/ns/cgroup", os.Getpid()))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd, Pdeathsig: syscall.SIGKILL}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("agent helper with %v: %v\n%s", caps, err, stderr.String())
	}
	var r agentResult
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("agent helper output %q: %v", stdout.String(), err)
	}
	return r
}

// helperAgent does what the agent does on a real node at start-up: the
// start-up checks, finding a pod's netns by its UID, loading capture and
// enrolling the pod; then it exits as on SIGTERM (Release: pins stay).
func helperAgent() (any, error) {
	var r agentResult
	rep := nodeinfo.Preflight(nodeinfo.PreflightConfig{PinDir: os.Getenv("NMT_PINS"), RequireHostPID: true, NodeCgroupNS: os.Getenv("NMT_NODENS")})
	if err := rep.Err(); err != nil {
		r.Preflight = err.Error()
	}
	sc := &nodeinfo.Scanner{Hierarchy: rep.Hierarchy, NodeView: true, NodeCgroupNS: os.Getenv("NMT_NODENS")}
	sb, err := sc.Find(os.Getenv("NMT_UID"))
	if err != nil {
		r.FindErr = err.Error()
		return r, nil
	}
	r.Sandbox = sb
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := redirect.Load(ctx, redirect.Config{CgroupRoot: os.Getenv("NMT_PODS"), AgentCgroup: os.Getenv("NMT_AGENT"), PinDir: os.Getenv("NMT_PINS"), Accel: redirect.AccelOff})
	if err != nil {
		r.LoadErr = err.Error()
		return r, nil
	}
	ep, err := c.Enroll(ctx, redirect.Pod{Name: "shop/web-0", Netns: sb.Netns, Cgroup: sb.Cgroup, IPs: []netip.Addr{netip.MustParseAddr(os.Getenv("NMT_IP"))}})
	if err != nil {
		r.LoadErr = err.Error()
		_ = c.Close()
		return r, nil
	}
	r.Cookie = ep.Cookie
	r.SourcePreserved, r.SourceReason = ep.SourcePreserved()
	return r, c.Release()
}

// attached counts the programs attached to target (a cgroup or netns).
func attached(t *testing.T, target string, typ ebpf.AttachType) int {
	t.Helper()
	f, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: typ})
	if err != nil {
		t.Fatalf("querying %s programs on %s: %v", typ, target, err)
	}
	return len(res.Programs)
}

// TestPrivAgentCapabilitiesAndUninstall proves the DaemonSet's privileges
// and the uninstall procedure on this kernel with the real capture code:
// with exactly the capabilities the DaemonSet adds (read from the rendered
// manifest) the agent passes its start-up checks, finds a pod's network
// namespace by UID although the pod runs as another user, loads capture and
// enrolls the pod; without CAP_SYS_PTRACE it cannot find the pod. After the
// agent is gone (pins keep capture in force: fail closed), the uninstall
// DaemonSet's script removes every program and link.
func TestPrivAgentCapabilitiesAndUninstall(t *testing.T) {
	n := newNode(t)
	caps := agentCaps(t)

	without := func(drop string) []string {
		var out []string
		for _, c := range caps {
			if c != drop {
				out = append(out, c)
			}
		}
		return out
	}
	r := runAgent(t, n, without("sys_ptrace"))
	if !strings.Contains(r.Preflight, "CAP_SYS_PTRACE") || !strings.Contains(r.FindErr, "permission denied") {
		t.Errorf("without CAP_SYS_PTRACE: preflight %q, find %q; want both to fail on the pod's netns link", r.Preflight, r.FindErr)
	}
	r = runAgent(t, n, without("sys_admin"))
	if !strings.Contains(r.Preflight, "CAP_SYS_ADMIN") || !strings.Contains(r.LoadErr, "operation not permitted") {
		t.Errorf("without CAP_SYS_ADMIN: preflight %q, enroll %q; want both to fail (setns)", r.Preflight, r.LoadErr)
	}
	_ = os.RemoveAll(n.pinDir) // what the refused agent loaded before failing

	r = runAgent(t, n, caps)
	if r.Preflight != "" || r.FindErr != "" || r.LoadErr != "" {
		t.Fatalf("agent with the DaemonSet's capabilities %v:\npreflight: %s\nfind: %s\ncapture: %s", caps, r.Preflight, r.FindErr, r.LoadErr)
	}
	if r.Sandbox.Cgroup != n.podCgroup || r.Cookie == 0 {
		t.Errorf("sandbox %+v cookie %d, want the pod cgroup %s", r.Sandbox, r.Cookie, n.podCgroup)
	}
	if !r.SourcePreserved {
		t.Errorf("with the DaemonSet's capabilities the pod's inbound delivery is not transparent: %s", r.SourceReason)
	}

	// The agent has exited; capture stays (fail closed).
	checks := []struct {
		target string
		typ    ebpf.AttachType
	}{
		{n.pods, ebpf.AttachCGroupInet4Connect},
		{n.pods, ebpf.AttachCGroupInet6Connect},
		{n.pods, ebpf.AttachCGroupSockOps},
		{n.netnsPath, ebpf.AttachSkLookup},
	}
	for _, c := range checks {
		if got := attached(t, c.target, c.typ); got == 0 {
			t.Errorf("after the agent exited: no %s program on %s; capture must stay in force", c.typ, c.target)
		}
	}

	// Uninstall: the cleanup DaemonSet's script, as it runs on a node.
	ds := get[*appsv1.DaemonSet](t, render(t, uninstall), "DaemonSet", ns, "nodemesh-node-cleanup")
	ctr := ds.Spec.Template.Spec.Containers[0]
	script := ctr.Command[len(ctr.Command)-1]
	script = strings.Replace(script, "exec sleep 2147483647", "exit 0", 1)
	cmd := exec.Command(ctr.Command[0], append(ctr.Command[1:len(ctr.Command)-1], script)...)
	cmd.Env = append(os.Environ(), "PIN_DIR="+n.pinDir)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "node clean") {
		t.Fatalf("cleanup script: %v\n%s", err, out)
	}
	probe := exec.Command(ctr.ReadinessProbe.Exec.Command[0], ctr.ReadinessProbe.Exec.Command[1:]...)
	probe.Env = cmd.Env
	if err := probe.Run(); err != nil {
		t.Errorf("cleanup readiness probe fails after cleanup: %v", err)
	}
	for _, c := range checks {
		// Links are released asynchronously after their last reference.
		deadline := time.Now().Add(10 * time.Second)
		for attached(t, c.target, c.typ) != 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if got := attached(t, c.target, c.typ); got != 0 {
			t.Errorf("after uninstall: %d %s programs still on %s", got, c.typ, c.target)
		}
	}
	if _, err := os.Stat(n.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory %s still exists: %v", n.pinDir, err)
	}
}
