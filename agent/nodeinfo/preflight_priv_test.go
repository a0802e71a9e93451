package nodeinfo

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// preflightResult is a Report as JSON (errors as strings).
type preflightResult struct {
	Results map[string]string // check -> error ("" passed)
	Err     string
}

func toResult(r Report) preflightResult {
	out := preflightResult{Results: map[string]string{}}
	for _, res := range r.Results {
		out.Results[res.Name] = ""
		if res.Err != nil {
			out.Results[res.Name] = res.Err.Error()
		}
	}
	if err := r.Err(); err != nil {
		out.Err = err.Error()
	}
	return out
}

func helperPreflight() (any, error) {
	return toResult(Preflight(PreflightConfig{RequireHostPID: true, NodeCgroupNS: os.Getenv("NODEINFO_TEST_NODENS")})), nil
}

// TestPrivPreflight: this kernel (the project's reference) passes every
// check, and a pin directory that is not on bpffs is refused when the
// agent may not mount one itself.
func TestPrivPreflight(t *testing.T) {
	h, _, _, _ := setupNode(t)
	r := Preflight(PreflightConfig{RequireHostPID: true, NodeCgroupNS: fmt.Sprintf("/proc/%d/ns/cgroup", os.Getpid())})
	for _, res := range r.Results {
		t.Logf("%-20s %v", res.Name, res.Err)
	}
	if err := r.Err(); err != nil {
		t.Fatalf("Preflight on this kernel: %v", err)
	}
	if r.Hierarchy.Path != h.Path || r.Hierarchy.Root != "/" {
		t.Errorf("Preflight hierarchy %+v, want %+v", r.Hierarchy, h)
	}
	want := []string{"capabilities", "bpf syscall", "program types", "map types", "helpers", "kernel BTF", "cgroup v2", "bpffs", "host PID namespace"}
	if len(r.Results) != len(want) {
		t.Errorf("ran %d checks, want %v", len(r.Results), want)
	}

	pin := filepath.Join(t.TempDir(), "nodemesh")
	r = Preflight(PreflightConfig{PinDir: pin, RequireBPFFS: true})
	err := r.Err()
	if err == nil || !strings.Contains(err.Error(), "not on a bpf filesystem") || !strings.Contains(err.Error(), "mount -t bpf") {
		t.Errorf("Preflight with a pin dir off bpffs: %v, want a refusal saying how to mount bpffs", err)
	}
	if r := Preflight(PreflightConfig{PinDir: pin}); r.Err() != nil {
		t.Errorf("Preflight allowed to mount bpffs: %v", r.Err())
	}
}

// TestPrivPreflightRefusesWithoutCapabilities runs the checks in a process
// whose capability bounding set lacks what capture needs, as a DaemonSet
// without the securityContext would: every missing capability is named,
// and so is the failing BPF.
func TestPrivPreflightRefusesWithoutCapabilities(t *testing.T) {
	_, _, agentDir, _ := setupNode(t)
	out := runHelper(t, "preflight", agentDir, []string{nodeNSEnv()},
		"setpriv", "--bounding-set", "-bpf,-net_admin,-sys_admin,-sys_ptrace,-perfmon", "--inh-caps", "-all")
	var r preflightResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("helper output %q: %v", out, err)
	}
	t.Logf("refusal:\n%s", r.Err)
	for _, c := range []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"} {
		if !strings.Contains(r.Results["capabilities"], c) {
			t.Errorf("capabilities check %q does not name %s", r.Results["capabilities"], c)
		}
	}
	bpf := r.Results["bpf syscall"] + r.Results["program types"]
	if !strings.Contains(bpf, "permission denied") {
		t.Errorf("BPF checks %q, want a permission error", bpf)
	}
	if !strings.Contains(r.Err, "cannot run nodemesh capture") {
		t.Errorf("Err %q is not the start-up refusal", r.Err)
	}
	if r.Results["cgroup v2"] == "" && r.Results["host PID namespace"] != "" {
		t.Errorf("host PID check failed without reason: %q", r.Results["host PID namespace"])
	}
}
