package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
)

// TestLabClusterCommands runs the cluster commands against the mesh demo's
// lab with the real agents and CA, from outside the lab: only the lab's
// kubeconfig, every agent reached through the real API server's
// pods/portforward (served by the lab's kubelet stand-in).
func TestLabClusterCommands(t *testing.T) {
	sp, err := demo.MeshSpec()
	if err != nil {
		t.Fatal(err)
	}
	l := labtest.Up(t, sp)
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := m.Stop(context.Background()); err != nil {
			t.Error(err)
		}
	}()
	t.Setenv("NODEMESH_ADMIN", "")
	kc := []string{"--kubeconfig", l.Kubeconfig()}
	run := func(want int, args ...string) string {
		t.Helper()
		out, errOut, code := ctl(t, append(args, kc...)...)
		if code != want {
			t.Fatalf("nodemeshctl %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, want, out, errOut)
		}
		return out
	}
	contains := func(what, out string, wants ...string) {
		t.Helper()
		for _, w := range wants {
			if !strings.Contains(out, w) {
				t.Errorf("%s lacks %q:\n%s", what, w, out)
			}
		}
	}

	// Cluster-wide: one line per agent.
	out := run(0, "status")
	contains("status", out, "node-1", "node-2", "nodemesh-agent-node-1", "nodemesh-agent-node-2", "node marks")
	// One node in detail.
	out = run(0, "status", "--node", "node-2")
	contains("status --node", out, "agent on node node-2: ready", "CHECK")

	var wl []map[string]json.RawMessage
	if err := json.Unmarshal([]byte(run(0, "workloads", "-o", "json")), &wl); err != nil || len(wl) != 2 {
		t.Fatalf("workloads -o json: %v, %d entries", err, len(wl))
	}
	out = run(0, "workloads")
	contains("workloads", out, "shop", "web-1", "web-2", "verified", "spiffe://cluster.local/ns/shop/sa/web")
	out = run(0, "certs", "--node", "node-1")
	contains("certs", out, "spiffe://cluster.local/ns/client/sa/client")
	run(0, "connections", "-o", "yaml")
	out = run(0, "exposure", "--node", "node-1", "--window", "5m")
	contains("exposure", out, "plaintext exposure on node node-1")

	// Live explain asks the source pod's agent.
	out = run(0, "policy", "explain", "--src", "client/client-1", "--dst", "shop/web-2", "--port", "8080")
	contains("policy explain", out, "ALLOW  client/client-1 (", "-> shop/web-2 (", "port 8080/TCP (mTLS as spiffe://cluster.local/ns/client/sa/client)")

	var vs []componentVersion
	if err := json.Unmarshal([]byte(run(0, "version", "-o", "json")), &vs); err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for _, v := range vs {
		got[v.Component]++
		if v.Version == "" || v.Error != "" {
			t.Errorf("version of %s %s: %q, error %q", v.Component, v.Pod, v.Version, v.Error)
		}
	}
	if got["client"] != 1 || got["kubernetes"] != 1 || got["agent"] != 2 || got["ca"] != 1 {
		t.Errorf("version lists %v, want a client, the API server, 2 agents and a CA", got)
	}

	// check: the lab has neither the DaemonSet nor the CRDs nor the
	// admission policy of the manifests (manifests' own lab tests install
	// those), so judge the findings one by one.
	out, _, _ = ctl(t, append([]string{"check", "-o", "json"}, kc...)...)
	var fs []finding
	if err := json.Unmarshal([]byte(out), &fs); err != nil {
		t.Fatalf("check -o json: %v\n%s", err, out)
	}
	status := map[string]string{}
	for _, f := range fs {
		key := f.Check + "/" + f.Node
		if status[key] != "fail" {
			status[key] = f.Status
		}
		t.Logf("%s %s %s: %s", f.Status, f.Check, f.Node, f.Message)
	}
	// The lab's API server is a build without version stamping: a warning.
	if status["kubernetes/"] == "fail" {
		t.Errorf("check kubernetes failed on the lab's API server")
	}
	for _, k := range []string{"agents/node-1", "agents/node-2", "capture/node-1", "capture/node-2", "svids/node-1", "svids/node-2",
		"unprotected/", "root/", "ca/node-1"} {
		if status[k] != "ok" {
			t.Errorf("check %s: %q, want ok", k, status[k])
		}
	}
	out, errOut, code := ctl(t, append([]string{"check"}, kc...)...)
	if code == 0 && strings.Contains(out, "FAIL") || code == 1 && !strings.Contains(out, "FAIL") {
		t.Errorf("check exit %d does not match its findings:\n%s%s", code, out, errOut)
	}

	// Errors say what to fix.
	_, errOut, _ = ctl(t, append([]string{"status", "--node", "node-9"}, kc...)...)
	contains("status --node node-9", errOut, `no nodemesh agent pod on node "node-9"`)
	_, errOut, _ = ctl(t, append([]string{"status", "-n", "elsewhere"}, kc...)...)
	contains("status -n elsewhere", errOut, "is nodemesh installed there")
	_, errOut, _ = ctl(t, append([]string{"status", "--context", "nope"}, kc...)...)
	contains("status --context nope", errOut, "nope")
}
