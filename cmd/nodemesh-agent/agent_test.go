package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// syncBuffer is a bytes.Buffer safe for the agent's log writes and the
// test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestObserverAgentFromStaticFiles runs the agent without root, API server
// or data plane: state from static YAML, admin, readiness and metrics.
func TestObserverAgentFromStaticFiles(t *testing.T) {
	dir := t.TempDir()
	manifest := `apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mode: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop}
spec: {nodeName: n2, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.2.10}
`
	if err := os.WriteFile(filepath.Join(dir, "cluster.yaml"), []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	adminAddr, metricsAddr, readyAddr := freeAddr(t), freeAddr(t), freeAddr(t)
	cfg, err := parseConfig([]string{"--node-name=n1", "--static-dir=" + dir, "--dataplane=false",
		"--admin-addr=" + adminAddr, "--metrics-addr=" + metricsAddr, "--readiness-addr=" + readyAddr}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var logs syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, &logs, &logs) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		if !strings.Contains(logs.String(), "agent stopped") {
			t.Errorf("no clean stop in the log:\n%s", logs.String())
		}
	}()
	c := nodeHTTP()
	waitfor.NoError(t, 30*time.Second, "ready", func() error {
		code, body, err := httpGet(c, "http://"+readyAddr+"/healthz/ready")
		if err == nil && code != 200 {
			err = &statusErr{code, body}
		}
		return err
	})
	_, body, err := httpGet(c, "http://"+adminAddr+"/config_dump/workloads")
	if err != nil {
		t.Fatal(err)
	}
	var pods []map[string]any
	if err := json.Unmarshal([]byte(body), &pods); err != nil || len(pods) != 1 || pods[0]["name"] != "web-0" ||
		pods[0]["identity"] != "spiffe://cluster.local/ns/shop/sa/web" || pods[0]["enrolled"] != true {
		t.Fatalf("workloads of n1: %v %s", err, body)
	}
	_, body, err = httpGet(c, "http://"+metricsAddr+"/metrics")
	if err != nil || !strings.Contains(body, "nodemesh_state_version") || !strings.Contains(body, "go_goroutines") {
		t.Fatalf("metrics: %v %s", err, body)
	}
}

func nodeHTTP() *http.Client {
	return &http.Client{Timeout: 10 * time.Second}
}

type statusErr struct {
	code int
	body string
}

func (e *statusErr) Error() string { return e.body }

// startBrokenDataplane runs the agent against an unreachable API server
// with --cgroup-root pointing nowhere and returns its error (it must exit,
// not hang unready).
func startBrokenDataplane(t *testing.T) error {
	t.Helper()
	dir := t.TempDir()
	kc := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig([]string{"--node-name=n1", "--kubeconfig=" + kc, "--cgroup-root=/nonexistent/nmtagent",
		"--bpf-pin-dir=" + filepath.Join(dir, "pins"),
		"--admin-addr=" + freeAddr(t), "--metrics-addr=" + freeAddr(t), "--readiness-addr=" + freeAddr(t)}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(context.Background(), cfg, &logs, &logs) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("agent returned nil with a broken data plane")
		}
		return err
	case <-time.After(60 * time.Second):
		t.Fatalf("agent hung with a broken data plane; log:\n%s", logs.String())
	}
	return nil
}

// TestPrivAgentExitsOnBadCgroupRoot: with the start-up checks passed (as
// root), a --cgroup-root that does not exist ends the agent with an error
// naming it, instead of leaving it running unready or hung.
func TestPrivAgentExitsOnBadCgroupRoot(t *testing.T) {
	privtest.Root(t)
	err := startBrokenDataplane(t)
	if !strings.Contains(err.Error(), "loading capture at cgroup /nonexistent/nmtagent") {
		t.Fatalf("agent exited with %q, want the capture load error for the bad cgroup root (did an earlier check fail?)", err)
	}
}

// TestAgentExitsWhenPreflightFails: without root the start-up checks refuse
// the node, and the agent exits with their report rather than hanging.
func TestAgentExitsWhenPreflightFails(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("as root the start-up checks pass; TestPrivAgentExitsOnBadCgroupRoot covers this path")
	}
	err := startBrokenDataplane(t)
	if strings.Contains(err.Error(), "/nonexistent/nmtagent") || !strings.Contains(err.Error(), "this node cannot run nodemesh capture") {
		t.Fatalf("agent exited with %q, want the preflight report", err)
	}
}
