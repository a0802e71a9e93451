package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodemesh/nodemesh/agent/admin"
)

// TestAdminCommands runs the commands against a real admin server.
func TestAdminCommands(t *testing.T) {
	srv, err := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry(), Info: map[string]string{"node": "node-7"}})
	if err != nil {
		t.Fatal(err)
	}
	srv.AddReadiness("state", func(context.Context) error { return nil })
	srv.AddReadiness("svids", func(context.Context) error { return errors.New("no SVID yet for spiffe://cluster.local/ns/a/sa/b") })
	srv.AddDump("workloads", func() any {
		return []map[string]any{{"namespace": "shop", "name": "web-0", "ips": []string{"10.0.0.1"}, "identity": "spiffe://cluster.local/ns/shop/sa/web", "enrolled": true, "phase": "Running"}}
	})
	srv.AddDump("capture", func() any {
		return map[string]any{"pods": []map[string]any{{"pod": "shop/web-0", "status": "verified"}}}
	})
	srv.AddDump("certificates", func() any {
		return []map[string]any{{"spiffeId": "spiffe://cluster.local/ns/shop/sa/web", "notAfter": time.Now().Add(time.Hour), "serial": "ab"}}
	})
	srv.SetConnections(func() any {
		return []map[string]any{{"direction": "outbound", "transport": "hbone", "pod": "shop/web-0", "src": "10.0.0.1:40000",
			"origDst": "10.96.0.10:80", "dst": "10.0.0.2:8080", "dstIdentity": "spiffe://cluster.local/ns/shop/sa/db", "start": time.Now(), "bytesSent": 12}}
	})
	hs := httptest.NewServer(srv.AdminHandler())
	defer hs.Close()

	tests := []struct {
		cmd  string
		args []string
		want []string
		code int
	}{
		// Not ready: the agent's answer is shown and the exit status is 0
		// (status reports; check judges).
		{"status", nil, []string{"node node-7: NOT READY", "svids", "no SVID yet"}, 0},
		{"workloads", nil, []string{"shop", "web-0", "10.0.0.1", "verified", "spiffe://cluster.local/ns/shop/sa/web"}, 0},
		{"certs", nil, []string{"spiffe://cluster.local/ns/shop/sa/web", "T", "ab"}, 0},
		{"connections", nil, []string{"outbound", "hbone", "10.96.0.10:80->10.0.0.2:8080", "spiffe://cluster.local/ns/shop/sa/db", "12"}, 0},
		{"status", []string{"-o", "json"}, []string{`"ready": false`}, 0},
		{"status", []string{"-o", "yaml"}, []string{`ready: false`, "node: node-7"}, 0},
		{"workloads", []string{"-o", "json"}, []string{`"workloads"`, `"capture"`}, 0},
		{"certs", []string{"--output", "yaml"}, []string{"spiffeId: spiffe://cluster.local/ns/shop/sa/web"}, 0},
	}
	for _, tt := range tests {
		out, errOut, code := ctl(t, append([]string{tt.cmd, "--admin", strings.TrimPrefix(hs.URL, "http://")}, tt.args...)...)
		if code != tt.code {
			t.Errorf("%s %v: exit %d, want %d (stderr %q)", tt.cmd, tt.args, code, tt.code, errOut)
		}
		for _, w := range tt.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s %v: output lacks %q:\n%s", tt.cmd, tt.args, w, out)
			}
		}
		if len(tt.args) > 0 && tt.args[1] == "json" && !json.Valid([]byte(out)) {
			t.Errorf("-o json output is not JSON: %s", out)
		}
	}

	// An observer agent (no data plane) has no capture section: workloads
	// still work; certs says why it has nothing.
	srv2, _ := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry()})
	srv2.AddDump("workloads", func() any { return []any{} })
	hs2 := httptest.NewServer(srv2.AdminHandler())
	defer hs2.Close()
	if _, errOut, code := ctl(t, "workloads", "--admin", hs2.URL); code != 0 {
		t.Fatalf("workloads without a data plane: exit %d: %s", code, errOut)
	}
	if _, errOut, code := ctl(t, "certs", "--admin", hs2.URL); code != 1 || !strings.Contains(errOut, "data plane") {
		t.Fatalf("certs without a data plane: exit %d: %s", code, errOut)
	}
	hs2.Close()
	if _, errOut, code := ctl(t, "status", "--admin", hs2.URL); code != 1 || !strings.Contains(errOut, "is nodemesh-agent running") {
		t.Fatalf("status with no agent: exit %d: %s", code, errOut)
	}
	// Usage errors exit 2 before anything is asked.
	for _, args := range [][]string{{"status", "-o", "xml"}, {"status", "extra"}, {"status", "--admin", "x", "--node", "n"}, {"certs", "--bogus"}} {
		if _, errOut, code := ctl(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2 (stderr %q)", args, code, errOut)
		}
	}
}

// ctl runs nodemeshctl with args and returns its stdout, stderr and exit
// status.
func ctl(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	stdout = &out
	defer func() { stdout = os.Stdout }()
	code := run(args, &errOut)
	return out.String(), errOut.String(), code
}
