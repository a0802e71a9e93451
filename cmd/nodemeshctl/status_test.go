package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http/httptest"
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
		cmd  func([]string) error
		args []string
		want []string
	}{
		{runStatus, nil, []string{"node node-7: NOT READY", "svids", "no SVID yet"}},
		{runWorkloads, nil, []string{"shop", "web-0", "10.0.0.1", "verified", "spiffe://cluster.local/ns/shop/sa/web"}},
		{runCerts, nil, []string{"spiffe://cluster.local/ns/shop/sa/web", "T", "ab"}},
		{runConnections, nil, []string{"outbound", "hbone", "10.96.0.10:80->10.0.0.2:8080", "spiffe://cluster.local/ns/shop/sa/db", "12"}},
		{runStatus, []string{"-o", "json"}, []string{`"ready": false`}},
		{runWorkloads, []string{"-o", "json"}, []string{`"workloads"`, `"capture"`}},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		stdout = &buf
		if err := tt.cmd(append([]string{"--admin", strings.TrimPrefix(hs.URL, "http://")}, tt.args...)); err != nil {
			t.Fatal(err)
		}
		for _, w := range tt.want {
			if !strings.Contains(buf.String(), w) {
				t.Errorf("output lacks %q:\n%s", w, buf.String())
			}
		}
		if len(tt.args) > 0 && tt.args[1] == "json" && !json.Valid(buf.Bytes()) {
			t.Errorf("-o json output is not JSON: %s", buf.String())
		}
	}

	// An observer agent (no data plane) has no capture section: workloads
	// still work; certs says why it has nothing.
	srv2, _ := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry()})
	srv2.AddDump("workloads", func() any { return []any{} })
	hs2 := httptest.NewServer(srv2.AdminHandler())
	defer hs2.Close()
	stdout = &bytes.Buffer{}
	if err := runWorkloads([]string{"--admin", hs2.URL}); err != nil {
		t.Fatal(err)
	}
	if err := runCerts([]string{"--admin", hs2.URL}); err == nil || !strings.Contains(err.Error(), "data plane") {
		t.Fatalf("certs without a data plane: %v", err)
	}
	hs2.Close()
	if err := runStatus([]string{"--admin", hs2.URL}); err == nil || !strings.Contains(err.Error(), "is nodemesh-agent running") {
		t.Fatalf("status with no agent: %v", err)
	}
	if err := runStatus([]string{"-o", "yaml"}); err == nil {
		t.Fatal("bad -o accepted")
	}
}
