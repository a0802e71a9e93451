// Package leaktest fails a test binary whose tests leave goroutines or
// file descriptors behind.
package leaktest

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// leakMarkers are stack substrings of goroutines a test must not leave
// behind: ours and those of the HTTP/2 and TLS code we drive.
var leakMarkers = []string{
	"github.com/nodemesh/nodemesh/",
	"golang.org/x/net/http2",
	"crypto/tls.",
}

// Main runs the tests of m and then fails the binary if goroutines from
// nodemesh, x/net/http2 or crypto/tls, or file descriptors, outlive them.
// Use it as `func TestMain(m *testing.M) { leaktest.Main(m) }`.
func Main(m *testing.M) {
	// Start the runtime's network poller first: its epoll descriptors
	// live for the whole process and are no leak.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	fds := countFDs()
	code := m.Run()
	if code == 0 {
		if err := checkLeaks(fds, 10*time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

func checkLeaks(fdsBefore int, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		leaked := leakedGoroutines()
		fds := countFDs()
		if len(leaked) == 0 && fds <= fdsBefore {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("leak check: %d goroutines left (fds before %d, after %d):\n%s",
				len(leaked), fdsBefore, fds, strings.Join(leaked, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func leakedGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var leaked []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "leaktest.leakedGoroutines") || strings.Contains(g, "leaktest.Main") {
			continue
		}
		for _, m := range leakMarkers {
			if strings.Contains(g, m) {
				leaked = append(leaked, g)
				break
			}
		}
	}
	return leaked
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}
