package identitytest

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Main runs the package's tests and then fails the run if goroutines or
// file descriptors opened by the tests are still around (after a grace
// period for connections that are closing). Use it as TestMain of packages
// that own sockets.
func Main(m *testing.M) { MainWithCleanup(m, nil) }

// MainWithCleanup is Main with a cleanup (e.g. stopping a shared API
// server) run after the tests and before the leak check.
func MainWithCleanup(m *testing.M, cleanup func()) {
	fds0 := countFDs()
	code := m.Run()
	if cleanup != nil {
		cleanup()
	}
	if code == 0 {
		if err := checkLeaks(fds0); err != nil {
			fmt.Fprintln(os.Stderr, "leak check:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func checkLeaks(fds0 int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		leaked := leakedGoroutines()
		fds := countFDs()
		if len(leaked) == 0 && (fds0 < 0 || fds <= fds0) {
			return nil
		}
		if time.Now().After(deadline) {
			if len(leaked) > 0 {
				return fmt.Errorf("%d goroutines still running after the tests:\n\n%s", len(leaked), strings.Join(leaked, "\n\n"))
			}
			return fmt.Errorf("%d file descriptors open after the tests, %d before", fds, fds0)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// leakedGoroutines lists goroutines other than this one and the runtime's,
// testing's and logging libraries' own.
func leakedGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i == 0 || g == "" { // the first is the caller
			continue
		}
		// lab/apiserver forks children from one thread parked for the life
		// of the process, on purpose (Pdeathsig).
		benign := strings.Contains(g, "lab/apiserver.startFromParkedThread")
		for _, s := range []string{
			"testing.(*M).", "testing.tRunner", "runtime.goexit", "os/signal.", "created by runtime.gc",
			"k8s.io/klog/v2.(*flushDaemon)", "runtime.ensureSigM", "runtime/trace", "created by testing.runFuzzing",
			"internal/poll.runtime_pollWait(", // only if nothing of ours is on the stack; see below
		} {
			if strings.Contains(g, s) && !strings.Contains(g, "nodemesh/") && !strings.Contains(g, "net/http.") && !strings.Contains(g, "grpc") {
				benign = true
				break
			}
		}
		if !benign {
			out = append(out, g)
		}
	}
	return out
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}
