package manifests_test

import (
	"encoding/json"
	"fmt"
	"os"
	"testing"
)

// helperEnv makes the test binary act as a helper process instead of
// running tests: the privileged tests start it with exactly the agent
// DaemonSet's capabilities, as the container runtime would.
const helperEnv = "NMTMANIFESTS_HELPER"

var helpers = map[string]func() (any, error){
	"agent": helperAgent,
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
