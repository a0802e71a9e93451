package inpod

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMain removes network namespaces left by killed runs of these tests
// (named nmtinpod-<pid>-*, with <pid> gone).
func TestMain(m *testing.M) {
	if ents, err := os.ReadDir("/var/run/netns"); err == nil && os.Geteuid() == 0 {
		for _, e := range ents {
			rest, ok := strings.CutPrefix(e.Name(), "nmtinpod-")
			if !ok {
				continue
			}
			pidStr, _, _ := strings.Cut(rest, "-")
			if pid, err := strconv.Atoi(pidStr); err == nil {
				if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
					exec.Command("ip", "netns", "del", e.Name()).Run()
				}
			}
		}
	}
	// Start the runtime's network poller (an epoll fd and an eventfd that
	// live for the process) before taking the baseline.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	g0, f0 := runtime.NumGoroutine(), openFDs()
	code := m.Run()
	if code == 0 {
		deadline := time.Now().Add(10 * time.Second)
		for runtime.NumGoroutine() > g0 || openFDs() > f0 {
			if time.Now().After(deadline) {
				fmt.Fprintf(os.Stderr, "leak check: %d goroutines (started with %d), %d fds (started with %d)\n",
					runtime.NumGoroutine(), g0, openFDs(), f0)
				code = 1
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	os.Exit(code)
}

func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}
