package inpod

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/nodemesh/nodemesh/agent/internal/leaktest"
)

// TestMain removes network namespaces left by killed runs of these tests
// (named nmtinpod-<pid>-*, with <pid> gone), then checks that the tests
// leave no goroutine and no descriptor behind.
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
	leaktest.Main(m)
}
