package main

import (
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodemesh/nodemesh/agent/admin"
)

func TestStatusRolloutSection(t *testing.T) {
	srv, err := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry(), Info: map[string]string{"node": "node-1"}})
	if err != nil {
		t.Fatal(err)
	}
	srv.AddDump("rollout", func() any {
		return map[string]any{"node": "node-1", "synced": true,
			"marks": []map[string]any{
				{"node": "node-1", "holder": "agent-a", "renewTime": time.Now(), "leaseDuration": "10s", "meshCapable": true},
				{"node": "node-2", "holder": "agent-b", "renewTime": time.Now().Add(-time.Minute), "leaseDuration": "10s", "meshCapable": false},
			},
			"unprotectedPods": []string{"shop/db-0 (node node-3)"}}
	})
	hs := httptest.NewServer(srv.AdminHandler())
	defer hs.Close()
	out, errOut, code := ctl(t, "status", "--admin", hs.URL)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{"node marks", "node-1", "agent-a", "node-2", "NO (stale", "shop/db-0 (node node-3)", "(1;"} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}

	// An agent without the rollout dump (no API server): no section, no error.
	bare, err := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry(), Info: map[string]string{"node": "node-9"}})
	if err != nil {
		t.Fatal(err)
	}
	hb := httptest.NewServer(bare.AdminHandler())
	defer hb.Close()
	out, errOut, code = ctl(t, "status", "--admin", hb.URL)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if strings.Contains(out, "node marks") {
		t.Errorf("rollout section without a rollout dump:\n%s", out)
	}
}
