package nodeinfo

import (
	"os"
	"testing"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

// helperEnv makes the test binary act as a helper process (see helpers)
// instead of running tests: privileged tests start it in a private cgroup
// namespace or with fewer capabilities, as a container runtime would start
// the agent.
const helperEnv = "NODEINFO_TEST_HELPER"

var helpers = map[string]func() (any, error){
	"discover":  helperDiscover,
	"preflight": helperPreflight,
}

func TestMain(m *testing.M) {
	privtest.RunHelper(helperEnv, helpers)
	os.Exit(m.Run())
}
