package nodeinfo

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

// testPrefix names every cgroup these tests create.
const testPrefix = "nmtnodeinfo-"

// sweepCgroups removes what a killed earlier run left: its processes are
// killed, then its cgroups removed bottom-up.
func sweepCgroups(t *testing.T, h Hierarchy) {
	t.Helper()
	ents, err := os.ReadDir(h.Path)
	if err != nil {
		t.Fatalf("listing %s: %v", h.Path, err)
	}
	for _, e := range ents {
		if e.IsDir() && strings.HasPrefix(e.Name(), testPrefix) {
			removeCgroupTree(t, filepath.Join(h.Path, e.Name()))
		}
	}
}

func removeCgroupTree(t *testing.T, root string) {
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
			if pid, err := strconv.Atoi(f); err == nil {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := os.Remove(dirs[i])
			if err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("removing cgroup %s: %v", dirs[i], err)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// testPod is a fake pod on this machine: a process in its own network
// namespace, in a cgroup laid out as kubelet's systemd driver lays it out.
type testPod struct {
	uid    string
	podDir string // the pod's cgroup
	cmd    *exec.Cmd
	conmon *exec.Cmd // a CRI-O conmon stand-in: in the pod cgroup, host netns
}

func newUID(t *testing.T) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// startIn starts argv in cgroup dir, in a new network namespace if newNet.
func startIn(t *testing.T, dir string, newNet bool, argv ...string) *exec.Cmd {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("opening cgroup %s: %v", dir, err)
	}
	defer unix.Close(fd)
	cmd := exec.Command(argv[0], argv[1:]...)
	// No Pdeathsig: it fires when the forking OS thread exits, and
	// HostView ends the threads it locks. A killed test leaves these
	// processes to the next run's sweep.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	if newNet {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNET
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %v in %s: %v", argv, dir, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

func mkdirs(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatalf("creating cgroup %s: %v", d, err)
		}
	}
}

// setupNode creates <root>/nmtnodeinfo-<pid>/{kubepods.slice/...,agent.scope}
// and one pod in it.
func setupNode(t *testing.T) (h Hierarchy, base, agentDir string, pod testPod) {
	t.Helper()
	privtest.Root(t)
	h, err := DiscoverHierarchy("")
	if err != nil {
		t.Fatalf("DiscoverHierarchy: %v", err)
	}
	sweepCgroups(t, h)
	base = filepath.Join(h.Path, fmt.Sprintf("%s%d", testPrefix, os.Getpid()))
	t.Cleanup(func() { removeCgroupTree(t, base) })

	pod.uid = newUID(t)
	slice := "kubepods-besteffort-pod" + strings.ReplaceAll(pod.uid, "-", "_") + ".slice"
	pod.podDir = filepath.Join(base, "kubepods.slice", "kubepods-besteffort.slice", slice)
	ctr := filepath.Join(pod.podDir, "cri-containerd-"+strings.Repeat("ab", 32)+".scope")
	conmon := filepath.Join(pod.podDir, "crio-conmon-"+strings.Repeat("cd", 32)+".scope")
	agentDir = filepath.Join(base, "agent.scope")
	mkdirs(t, ctr, conmon, agentDir)

	// The conmon stand-in starts first, so it has the lower pid.
	pod.conmon = startIn(t, conmon, false, "sleep", "600")
	pod.cmd = startIn(t, ctr, true, "sleep", "600")
	return h, base, agentDir, pod
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatalf("stat %s: %v", p, err)
	}
	return st.Ino
}

func checkSandbox(t *testing.T, sb Sandbox, pod testPod) {
	t.Helper()
	pid := pod.cmd.Process.Pid
	if sb.UID != pod.uid || sb.PID != pid {
		t.Errorf("sandbox %+v: want pod %s at pid %d (not conmon's %d)", sb, pod.uid, pid, pod.conmon.Process.Pid)
	}
	want := inode(t, fmt.Sprintf("/proc/%d/ns/net", pid))
	if sb.NetnsInode != want || want == inode(t, "/proc/self/ns/net") {
		t.Errorf("sandbox netns inode %d, want %d (the pod's own, not the host's)", sb.NetnsInode, want)
	}
	if sb.Cgroup == "" || inode(t, sb.Cgroup) != inode(t, pod.podDir) {
		t.Errorf("sandbox cgroup %q, want the pod cgroup %s", sb.Cgroup, pod.podDir)
	}
}

func TestPrivDiscoverPodNetns(t *testing.T) {
	h, _, _, pod := setupNode(t)
	if !IsRootCgroup(h.Path) {
		t.Fatalf("hierarchy %s is not a root cgroup", h.Path)
	}
	s := &Scanner{Hierarchy: h}
	sb, err := s.Find(pod.uid)
	if err != nil {
		t.Fatalf("Find: %v", err)
	}
	checkSandbox(t, sb, pod)

	f, err := s.OpenNetns(sb)
	if err != nil {
		t.Fatalf("OpenNetns: %v", err)
	}
	defer f.Close()
	// The open namespace is the pod's: its only interface is lo.
	ifs, err := interfacesIn(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(ifs) != 1 || ifs[0] != "lo" {
		t.Errorf("interfaces in the pod netns: %v, want [lo]", ifs)
	}

	all, errs, err := s.Scan()
	if err != nil {
		t.Fatalf("Scan: %v", err)
	}
	if got, ok := all[pod.uid]; !ok || got != sb {
		t.Errorf("Scan()[%s] = %+v, %v; want %+v", pod.uid, got, ok, sb)
	}
	if err, ok := errs[pod.uid]; ok {
		t.Errorf("Scan error for the pod: %v", err)
	}

	// Gone: the pod's process exits; the conmon stand-in alone is in the
	// host netns, like a hostNetwork pod.
	_ = pod.cmd.Process.Kill()
	_ = pod.cmd.Wait()
	if _, err := s.OpenNetns(sb); err == nil {
		t.Error("OpenNetns of an exited sandbox succeeded")
	}
	if _, err := s.Find(pod.uid); !errors.Is(err, ErrHostNetwork) {
		t.Errorf("Find after exit: %v, want ErrHostNetwork", err)
	}
	_ = pod.conmon.Process.Kill()
	_ = pod.conmon.Wait()
	if _, err := s.Find(pod.uid); !errors.Is(err, ErrPodNotFound) {
		t.Errorf("Find after all exited: %v, want ErrPodNotFound", err)
	}
}

// interfacesIn lists the interfaces of the network namespace f, from a
// child process (ip) that joins it, so no thread of the test changes netns.
func interfacesIn(f *os.File) ([]string, error) {
	cmd := exec.Command("ip", "-o", "link", "show")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Path = "/usr/bin/nsenter"
	cmd.Args = []string{"nsenter", "--net=/proc/self/fd/3", "ip", "-o", "link", "show"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("listing interfaces in the pod netns: %w: %s", err, out)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fs := strings.Fields(line)
		if len(fs) > 1 {
			names = append(names, strings.TrimSuffix(strings.SplitN(fs[1], "@", 2)[0], ":"))
		}
	}
	return names, nil
}

// discoverResult is what the "discover" helper reports.
type discoverResult struct {
	OwnCgroup string    // /proc/self/cgroup, v2 line
	Own       Hierarchy // DiscoverHierarchy: the container's view
	OwnErr    string    // Scanner without NodeView
	Node      Hierarchy // DiscoverNodeHierarchy
	Sandbox   Sandbox   // Scanner with NodeView
}

func helperDiscover() (any, error) {
	uid := os.Getenv("NODEINFO_TEST_UID")
	var r discoverResult
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	r.OwnCgroup = strings.TrimSpace(string(b))
	if r.Own, err = DiscoverHierarchy(""); err != nil {
		return nil, fmt.Errorf("own view: %w", err)
	}
	if _, err := (&Scanner{Hierarchy: r.Own}).Find(uid); err != nil {
		r.OwnErr = err.Error()
	}
	// The test process stands in for the node's init (pid 1 may be out of
	// reach where tests run).
	nodeNS := os.Getenv("NODEINFO_TEST_NODENS")
	if r.Node, err = DiscoverNodeHierarchy("", nodeNS); err != nil {
		return nil, fmt.Errorf("node view: %w", err)
	}
	if r.Sandbox, err = (&Scanner{Hierarchy: r.Node, NodeView: true, NodeCgroupNS: nodeNS}).Find(uid); err != nil {
		return nil, fmt.Errorf("node view: %w", err)
	}
	return r, nil
}

// runHelper runs this test binary as helper name, through the wrapper
// command (e.g. unshare, setpriv) started in cgroup dir.
func runHelper(t *testing.T, name, dir string, env []string, wrapper ...string) []byte {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("opening cgroup %s: %v", dir, err)
	}
	defer unix.Close(fd)
	argv := append(append([]string{}, wrapper...), self)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(append(os.Environ(), helperEnv+"="+name), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd, Pdeathsig: syscall.SIGKILL}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("helper %s (%v): %v\n%s", name, wrapper, err, stderr.String())
	}
	return stdout.Bytes()
}

// TestPrivDiscoverFromContainerCgroupNamespace runs discovery as the agent
// runs in a container: in a private cgroup namespace rooted at its own
// cgroup, two levels below the node's root, with the node's hierarchy
// visible only through a mount whose root the kernel shows as "/../..".
func TestPrivDiscoverFromContainerCgroupNamespace(t *testing.T) {
	h, base, agentDir, pod := setupNode(t)
	out := runHelper(t, "discover", agentDir, []string{"NODEINFO_TEST_UID=" + pod.uid, nodeNSEnv()}, "unshare", "--cgroup")
	var r discoverResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("helper output %q: %v", out, err)
	}
	t.Logf("helper: own cgroup %q, own view %+v (%s), node view %+v", r.OwnCgroup, r.Own, r.OwnErr, r.Node)
	if !strings.Contains(r.OwnCgroup, "0::/\n") && !strings.HasSuffix(r.OwnCgroup, "0::/") {
		t.Fatalf("helper is not at the root of its own cgroup namespace: %q", r.OwnCgroup)
	}
	depth := strings.Count(strings.TrimPrefix(agentDir, h.Path), "/")
	if wantRoot := strings.TrimSuffix(strings.Repeat("/..", depth), ""); r.Own.Root != wantRoot || r.Own.Path != h.Path {
		t.Errorf("own view %+v, want the same mount with root %q", r.Own, wantRoot)
	}
	// From its own namespace the pod's ancestors' names are hidden: the
	// scanner must refuse rather than name a wrong cgroup.
	if !strings.Contains(r.OwnErr, "hides") {
		t.Errorf("scanner without NodeView: error %q, want a refusal to map a hidden path", r.OwnErr)
	}
	if r.Node.Root != "/" || r.Node.Path != h.Path || r.Node.Layout != h.Layout {
		t.Errorf("node view %+v, want %+v", r.Node, h)
	}
	checkSandbox(t, r.Sandbox, pod)
	_ = base
}

// nodeNSEnv points helpers at this test process's cgroup namespace as the
// node's.
func nodeNSEnv() string {
	return fmt.Sprintf("NODEINFO_TEST_NODENS=/proc/%d/ns/cgroup", os.Getpid())
}

func TestPrivDiscoverNode(t *testing.T) {
	h, _, _, pod := setupNode(t)
	n, rep, err := DiscoverNode(PreflightConfig{RequireHostPID: true, NodeCgroupNS: fmt.Sprintf("/proc/%d/ns/cgroup", os.Getpid())})
	if err != nil {
		t.Fatalf("DiscoverNode: %v (%+v)", err, rep)
	}
	if n.Hierarchy != h || n.PodsCgroup == "" {
		t.Errorf("node %+v, want hierarchy %+v", n, h)
	}
	netns, cgroup, err := n.PodNetns(pod.uid)
	if err != nil {
		t.Fatalf("PodNetns: %v", err)
	}
	if want := fmt.Sprintf("/proc/%d/ns/net", pod.cmd.Process.Pid); netns != want || inode(t, cgroup) != inode(t, pod.podDir) {
		t.Errorf("PodNetns = %q, %q; want %q, %q", netns, cgroup, want, pod.podDir)
	}
	if _, _, err := n.PodNetns(newUID(t)); !errors.Is(err, ErrPodNotFound) {
		t.Errorf("PodNetns(unknown) = %v, want ErrPodNotFound", err)
	}
}
