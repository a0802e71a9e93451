package cni

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"testing"
	"time"
)

// TestMain checks that the tests leave no goroutine and no descriptor
// behind: the server owns sockets and the namespace descriptors it is sent.
func TestMain(m *testing.M) {
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
