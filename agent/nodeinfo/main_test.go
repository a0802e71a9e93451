package nodeinfo

import (
	"encoding/json"
	"fmt"
	"os"
	"testing"
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
	if name := os.Getenv(helperEnv); name != "" {
		fn, ok := helpers[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
			os.Exit(2)
		}
		v, err := fn()
		if err != nil {
			fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
			os.Exit(1)
		}
		if err := json.NewEncoder(os.Stdout).Encode(v); err != nil {
			fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}
