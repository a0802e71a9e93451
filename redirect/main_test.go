package redirect

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// testPrefix names every kernel object these tests create.
const testPrefix = "nmtcap-"

// agentCgroup is the cgroup the test process moves into for privileged
// tests, standing in for the agent's own cgroup outside the pod root.
var agentCgroup string

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(m.Run())
	}
	restore := func() {}
	if os.Geteuid() == 0 {
		sweep()
		var err error
		restore, err = enterAgentCgroup()
		if err != nil {
			fmt.Fprintln(os.Stderr, "setting up the test agent cgroup:", err)
			os.Exit(1)
		}
	}
	// Start the runtime's network poller (an epoll fd and an eventfd that
	// live for the process) before taking the baseline.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	g0, f0 := runtime.NumGoroutine(), openFDs()
	code := m.Run()
	// The fuzzing engine keeps its own goroutines (os/signal); skip then.
	if f := flag.Lookup("test.fuzz"); code == 0 && (f == nil || f.Value.String() == "") {
		if err := checkLeaks(g0, f0); err != nil {
			fmt.Fprintln(os.Stderr, "leak check:", err)
			code = 1
		}
	}
	restore()
	os.Exit(code)
}

// fdSlack allows for descriptors that libraries open once and keep (the
// cilium/ebpf kernel BTF handle and feature probes).
const fdSlack = 4

// checkLeaks fails when goroutines or file descriptors (sockets, BPF
// objects) outlive the tests that created them.
func checkLeaks(g0, f0 int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		g, f := runtime.NumGoroutine(), openFDs()
		if g <= g0 && f <= f0+fdSlack {
			return nil
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			return fmt.Errorf("%d goroutines (started with %d), %d open fds (started with %d, slack %d)\n%s", g, g0, f, f0, fdSlack, buf)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}

// enterAgentCgroup moves the test process into its own cgroup.
func enterAgentCgroup() (func(), error) {
	mnt, err := Cgroup2Mount()
	if err != nil {
		return nil, err
	}
	orig, err := OwnCgroup()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(mnt, fmt.Sprintf("%s%d-agent", testPrefix, os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, err
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0); err != nil {
		os.Remove(dir)
		return nil, err
	}
	agentCgroup = dir
	return func() {
		os.WriteFile(filepath.Join(orig, "cgroup.procs"), pid, 0)
		os.Remove(dir)
	}, nil
}

// sweep removes what an earlier, killed run of these tests left behind:
// network namespaces, cgroups and bpffs pins whose owner pid is gone.
func sweep() {
	dead := func(name string) bool {
		rest := strings.TrimPrefix(name, testPrefix)
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			return false
		}
		_, err = os.Stat(fmt.Sprintf("/proc/%d", pid))
		return err != nil
	}
	if ents, err := os.ReadDir("/var/run/netns"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), testPrefix) && dead(e.Name()) {
				exec.Command("ip", "netns", "del", e.Name()).Run()
			}
		}
	}
	if mnt, err := Cgroup2Mount(); err == nil {
		if ents, err := os.ReadDir(mnt); err == nil {
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), testPrefix) && dead(e.Name()) {
					removeCgroupTree(filepath.Join(mnt, e.Name()))
				}
			}
		}
	}
	if ents, err := os.ReadDir("/sys/fs/bpf"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), testPrefix) && dead(e.Name()) {
				os.RemoveAll(filepath.Join("/sys/fs/bpf", e.Name()))
			}
		}
	}
}

// removeCgroupTree removes a cgroup and its children (they must be empty
// of processes; pods' helper processes are killed before).
func removeCgroupTree(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.IsDir() {
			removeCgroupTree(filepath.Join(dir, e.Name()))
		}
	}
	os.Remove(dir)
}
