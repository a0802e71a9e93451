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
	for _, args := range [][]string{{"lab", "up"}, {"lab", "down"}, {"lab", "status"}, {"lab", "exec", "a/b", "--", "true"},
		{"cluster", "up"}, {"cluster", "down"}, {"cluster", "status"}} {
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

// TestHelp checks the help of every command: exit status 0, flags listed
// once with their defaults once, and the defects of the hand-written help
// gone (defaults printed twice, a backtick-quoted phrase shown as an
// argument name, policy --help without flags, lab workload -h failing).
func TestHelp(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want []string
	}{
		{[]string{"--help"}, []string{"Cluster commands:", "check", "version", "status", "lab", "bench", "completion", "--kubeconfig", "--context", "-n, --namespace"}},
		{[]string{"help", "status"}, []string{"--node", "-o, --output"}},
		{[]string{"status", "--help"}, []string{"--node", "--admin"}},
		{[]string{"policy", "--help"}, []string{"explain"}},
		{[]string{"policy", "explain", "--help"}, []string{"--src", "--dst", "--port", "--from-files", "--node"}},
		{[]string{"exposure", "-h"}, []string{"--window", "--if-strict", "--top"}},
		{[]string{"check", "--help"}, []string{"unprotected", "Exit status 1"}},
		{[]string{"version", "--help"}, []string{"--client"}},
	} {
		out, errOut, code := ctl(t, tt.args...)
		if code != 0 {
			t.Errorf("%v: exit %d (stderr %q)", tt.args, code, errOut)
		}
		for _, w := range tt.want {
			if !strings.Contains(out, w) {
				t.Errorf("%v: help lacks %q:\n%s", tt.args, w, out)
			}
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.Count(line, "(default") > 1 {
				t.Errorf("%v: default printed twice: %q", tt.args, line)
			}
		}
	}
	// The lab's own parsers print to the process's stderr: run the binary.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"lab", "--help"}, {"lab", "workload", "-h"}, {"lab", "workload", "http", "-h"}, {"lab", "demo", "-h"}, {"cluster", "--help"}, {"cluster", "up", "-h"}, {"bench", "-h"}} {
		cmd := exec.Command(exe, args...)
		cmd.Env = append(os.Environ(), "NODEMESHCTL_TEST_MAIN=1")
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("%v: %v\n%s", args, err, b)
		}
		if strings.Contains(string(b), "-agent-bin make build") || strings.Contains(string(b), "`") {
			t.Errorf("%v: a backtick-quoted phrase became an argument name:\n%s", args, b)
		}
	}
}

func TestCompletionAndClientVersion(t *testing.T) {
	for _, sh := range []string{"bash", "zsh", "fish", "powershell"} {
		out, errOut, code := ctl(t, "completion", sh)
		if code != 0 || !strings.Contains(out, "nodemeshctl") {
			t.Errorf("completion %s: exit %d, stderr %q, %d bytes", sh, code, errOut, len(out))
		}
	}
	out, _, code := ctl(t, "__complete", "status", "-o", "")
	if code != 0 || !strings.Contains(out, "yaml") {
		t.Errorf("completing -o: exit %d: %q", code, out)
	}
	out, errOut, code := ctl(t, "version", "--client", "-o", "json")
	if code != 0 || !strings.Contains(out, `"component": "client"`) {
		t.Errorf("version --client: exit %d %q %q", code, out, errOut)
	}
	// No kubeconfig: a clear error, exit 1.
	t.Setenv("KUBECONFIG", "/nonexistent/kubeconfig")
	t.Setenv("HOME", t.TempDir())
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("NODEMESH_ADMIN", "")
	if _, errOut, code := ctl(t, "status"); code != 1 || !strings.Contains(errOut, "kubeconfig") {
		t.Errorf("status without a kubeconfig: exit %d: %q", code, errOut)
	}
}
