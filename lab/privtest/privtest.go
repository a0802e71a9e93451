// Package privtest gates the privileged and lab test tiers.
//
// Privileged tests need root (network namespaces, BPF, cgroups). They skip
// with a reason when that is missing, except when NODEMESH_REQUIRE_PRIVILEGED=1
// is set (CI sets it): then a skip is a failure, so a run can never pass by
// skipping the tests that matter.
package privtest

import (
	"encoding/json"
	"fmt"
	"os"
	"testing"
)

// RequireEnv is the variable that turns skips of privileged tests into failures.
const RequireEnv = "NODEMESH_REQUIRE_PRIVILEGED"

// Required reports whether privileged tests must run rather than skip.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Skip skips the test with reason, or fails it when privileged tests are required.
func Skip(t testing.TB, reason string) {
	t.Helper()
	if Required() {
		t.Fatalf("%s, and %s=1 forbids skipping privileged tests", reason, RequireEnv)
	}
	t.Skip(reason)
}

// Root skips (or fails, see Required) unless the test runs as root.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (network namespaces, BPF, cgroups); run with sudo")
	}
}

// RunHelper makes a test binary act as a helper process when the variable
// env names one of helpers: privileged tests re-execute their own binary
// with fewer capabilities or in other namespaces, as a container runtime
// would start the agent. The helper's result is written to stdout as JSON
// and the process exits (0 on success, 1 on error, 2 for an unknown name).
// Without env set it returns, and TestMain goes on to run the tests.
func RunHelper(env string, helpers map[string]func() (any, error)) {
	name := os.Getenv(env)
	if name == "" {
		return
	}
	fn, ok := helpers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
		os.Exit(2)
	}
	v, err := fn()
	if err == nil {
		err = json.NewEncoder(os.Stdout).Encode(v)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
		os.Exit(1)
	}
	os.Exit(0)
}
