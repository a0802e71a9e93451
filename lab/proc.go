package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// reexecEnv marks a process the lab started by re-executing its creator's
// own binary to run a built-in program (a workload or the API proxy). The
// init below catches it before main or TestMain run, so any binary that
// imports this package - nodemeshctl, a test binary - can serve as the
// workload image.
const reexecEnv = "NODEMESH_LAB_REEXEC"

func init() {
	if os.Getenv(reexecEnv) != "1" {
		return
	}
	os.Exit(reexecMain(os.Args[1:]))
}

func reexecMain(args []string) int {
	switch {
	case len(args) >= 2 && args[0] == "lab" && args[1] == "workload":
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		return workload.Main(ctx, args[2:], os.Stdout, os.Stderr)
	case len(args) >= 2 && args[0] == "lab" && args[1] == "apiproxy":
		return apiProxyMain(args[2:])
	}
	fmt.Fprintf(os.Stderr, "nodemesh lab: cannot run %q as a built-in program; only `nodemeshctl lab workload ...` is built in\n", strings.Join(args, " "))
	return 2
}

// command resolves a pod or Exec argv. "nodemeshctl" is the lab's built-in
// workload image: the configured binary, or this process's own executable
// re-executed through the init hook above.
func (l *Lab) command(ctx context.Context, argv []string) (*exec.Cmd, error) {
	if len(argv) == 0 {
		return nil, errors.New("empty command")
	}
	var cmd *exec.Cmd
	if argv[0] == "nodemeshctl" {
		self := l.workloadBin
		if self == "" {
			exe, err := os.Executable()
			if err != nil {
				return nil, fmt.Errorf("finding this executable to run %q: %w", strings.Join(argv, " "), err)
			}
			self = exe
		}
		cmd = exec.CommandContext(ctx, self, argv[1:]...)
		cmd.Args[0] = "nodemeshctl"
		cmd.Env = append(cmd.Env, reexecEnv+"=1")
	} else {
		path, err := exec.LookPath(argv[0])
		if err != nil {
			return nil, fmt.Errorf("finding %q: %w", argv[0], err)
		}
		cmd = exec.CommandContext(ctx, path, argv[1:]...)
	}
	cmd.Dir = "/"
	return cmd, nil
}

func baseEnv() []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	env := []string{"PATH=" + path, "HOME=/root", "LANG=C.UTF-8"}
	// Let coverage-instrumented test binaries that serve as the workload
	// image write their profiles.
	if d := os.Getenv("GOCOVERDIR"); d != "" {
		env = append(env, "GOCOVERDIR="+d)
	}
	return env
}

func (l *Lab) podEnv(p *Pod) []string {
	return append(baseEnv(),
		workload.EnvPodName+"="+p.Name,
		workload.EnvPodNamespace+"="+p.Namespace,
		workload.EnvPodIP+"="+p.IP,
		workload.EnvNodeName+"="+p.Node,
	)
}

// spawn starts cmd inside the network namespace netnsPath and born into
// the cgroup directory cgroupDir (clone3 CLONE_INTO_CGROUP), so not a
// single instruction of it runs outside the pod. detach puts it in its own
// session so it outlives its creator.
func spawn(cmd *exec.Cmd, netnsPath, cgroupDir string, detach bool) error {
	fd, err := unix.Open(cgroupDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening cgroup %s: %w", cgroupDir, err)
	}
	defer unix.Close(fd)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd, Setsid: detach}
	if err := netns.Start(netnsPath, cmd); err != nil {
		return fmt.Errorf("starting %s in %s: %w", strings.Join(cmd.Args, " "), netnsPath, err)
	}
	return nil
}

// openLog opens (appending) a process log file in the state directory.
func openLog(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating log directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening log %s: %w", path, err)
	}
	return f, nil
}

// track reaps a child started by this process, so it never lingers as a
// zombie; the lab's WaitGroup owns the goroutine.
func (l *Lab) track(cmd *exec.Cmd) {
	done := make(chan struct{})
	l.cmu.Lock()
	l.children[cmd.Process.Pid] = done
	l.cmu.Unlock()
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		_ = cmd.Wait()
		close(done)
	}()
}

// exited reports whether pid (a child of this process or not) is gone.
func (l *Lab) exited(pid int) bool {
	l.cmu.Lock()
	done, ok := l.children[pid]
	l.cmu.Unlock()
	if ok {
		select {
		case <-done:
			return true
		default:
			return false
		}
	}
	return !alive(pid)
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) S ...: the state follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}

// Exec runs argv inside the pod (its network namespace and cgroup, with
// the pod's environment) and returns its combined output. A non-zero exit
// is an error that includes the output. An argv[0] of "nodemeshctl" runs
// the built-in workloads, e.g.
//
//	l.Exec(ctx, "client/client-1", []string{"nodemeshctl", "lab", "workload", "get", "http://10.96.0.10/"})
func (l *Lab) Exec(ctx context.Context, pod string, argv []string) ([]byte, error) {
	var out bytes.Buffer
	err := l.ExecStream(ctx, pod, argv, nil, &out, &out)
	if err != nil {
		return out.Bytes(), fmt.Errorf("%w: %s", err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

// ExecStream is Exec with the caller's streams. The error wraps an
// *exec.ExitError when the command ran and failed.
func (l *Lab) ExecStream(ctx context.Context, pod string, argv []string, stdin io.Reader, stdout, stderr io.Writer) error {
	p, err := l.Pod(pod)
	if err != nil {
		return err
	}
	return l.execIn(ctx, "pod "+p.Key(), p.Netns, p.Cgroup, l.podEnv(&p), argv, stdin, stdout, stderr)
}

// ExecNode runs argv inside the node's network namespace (in the node's
// process cgroup) and returns its combined output.
func (l *Lab) ExecNode(ctx context.Context, node string, argv []string) ([]byte, error) {
	var out bytes.Buffer
	err := l.ExecNodeStream(ctx, node, argv, nil, &out, &out)
	if err != nil {
		return out.Bytes(), fmt.Errorf("%w: %s", err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

// ExecNodeStream is ExecNode with the caller's streams.
func (l *Lab) ExecNodeStream(ctx context.Context, node string, argv []string, stdin io.Reader, stdout, stderr io.Writer) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	env := append(baseEnv(), workload.EnvNodeName+"="+n.Name)
	return l.execIn(ctx, "node "+n.Name, n.Netns, n.ProcessCgroup, env, argv, stdin, stdout, stderr)
}

func (l *Lab) execIn(ctx context.Context, where, netnsPath, cgroupDir string, env, argv []string, stdin io.Reader, stdout, stderr io.Writer) error {
	cmd, err := l.command(ctx, argv)
	if err != nil {
		return fmt.Errorf("exec in %s: %w", where, err)
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, stdout, stderr
	cmd.WaitDelay = 5 * time.Second
	if err := spawn(cmd, netnsPath, cgroupDir, false); err != nil {
		return fmt.Errorf("exec in %s: %w", where, err)
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("exec in %s: %s: %w", where, strings.Join(argv, " "), err)
	}
	return nil
}

// logTail returns the last n bytes of a log file, for error messages.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}

// listening reports whether pid's network namespace has a TCP socket
// listening on port, IPv4 or IPv6 (a Go server on ":8080" with network
// "tcp" is one dual-stack IPv6 socket, seen only in /proc/<pid>/net/tcp6).
// Both files are per network namespace; tcp6 is absent without IPv6.
func listening(pid int, port int32) (bool, error) {
	var firstErr error
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/net/" + f)
		if err != nil {
			if firstErr == nil && f == "tcp" {
				firstErr = err
			}
			continue
		}
		if listensOn(b, port) {
			return true, nil
		}
	}
	return false, firstErr
}

// listensOn reports whether a /proc/net/tcp or tcp6 table has a socket in
// LISTEN state on port.
func listensOn(table []byte, port int32) bool {
	want := fmt.Sprintf(":%04X", port)
	lines := strings.Split(string(table), "\n")
	if len(lines) < 2 {
		return false
	}
	for _, line := range lines[1:] {
		f := strings.Fields(line)
		// sl local_address rem_address st ...; st 0A is LISTEN.
		if len(f) > 3 && f[3] == "0A" && strings.HasSuffix(f[1], want) {
			return true
		}
	}
	return false
}
