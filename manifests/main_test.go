package manifests_test

import (
	"os"
	"testing"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

// helperEnv makes the test binary act as a helper process instead of
// running tests: the privileged tests start it with exactly the agent
// DaemonSet's capabilities, as the container runtime would.
const helperEnv = "NMTMANIFESTS_HELPER"

var helpers = map[string]func() (any, error){
	"agent": helperAgent,
}

func TestMain(m *testing.M) {
	privtest.RunHelper(helperEnv, helpers)
	os.Exit(m.Run())
}
