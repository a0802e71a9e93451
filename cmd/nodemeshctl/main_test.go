package main

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestMain lets the tests run this binary as nodemeshctl itself.
func TestMain(m *testing.M) {
	if os.Getenv("NODEMESHCTL_TEST_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

func TestUsageAndUnknownCommands(t *testing.T) {
	var b bytes.Buffer
	if code := run(nil, &b); code != 2 || !strings.Contains(b.String(), "lab") {
		t.Errorf("no arguments: code %d, output %q", code, b.String())
	}
	b.Reset()
	if code := run([]string{"nope"}, &b); code != 2 || !strings.Contains(b.String(), `unknown command "nope"`) {
		t.Errorf("unknown command: code %d, output %q", code, b.String())
	}
	b.Reset()
	if code := run([]string{"lab", "frobnicate"}, &b); code != 2 || !strings.Contains(b.String(), `unknown lab command "frobnicate"`) {
		t.Errorf("unknown lab command: code %d, output %q", code, b.String())
	}
	b.Reset()
	if code := run([]string{"lab", "exec"}, &b); code != 2 || !strings.Contains(b.String(), "name a pod") {
		t.Errorf("lab exec without a pod: code %d, output %q", code, b.String())
	}
}

func TestLabWorkloadNeedsNoRoot(t *testing.T) {
	if code := run([]string{"lab", "workload", "get", "--timeout", "1s", "http://127.0.0.1:1/"}, io.Discard); code != 1 {
		t.Errorf("a failing get: exit %d, want 1", code)
	}
}

// TestNotRootOneLine runs `nodemeshctl lab up|down|status` as an
// unprivileged user: each must say so in one line and exit 1.
func TestNotRootOneLine(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		// Drop to nobody; the binary must be somewhere nobody can run it.
		dir, err := os.MkdirTemp("", "nodemeshctl-test")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(exe)
		if err != nil {
			t.Fatal(err)
		}
		exe = filepath.Join(dir, "nodemeshctl.test")
		if err := os.WriteFile(exe, b, 0o755); err != nil {
			t.Fatal(err)
		}
		cred = &syscall.Credential{Uid: 65534, Gid: 65534}
	}
	for _, args := range [][]string{{"lab", "up"}, {"lab", "down"}, {"lab", "status"}, {"lab", "exec", "a/b", "--", "true"}} {
		cmd := exec.Command(exe, args...)
		cmd.Env = []string{"NODEMESHCTL_TEST_MAIN=1", "PATH=/usr/bin:/bin"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 1 {
			t.Errorf("%v: %v, want exit status 1", args, err)
		}
		out := strings.TrimRight(stderr.String(), "\n")
		if strings.Count(out, "\n") != 0 || !strings.Contains(out, "needs root") {
			t.Errorf("%v: want one line saying it needs root, got %q", args, out)
		}
	}
}
