package main

import (
	"bytes"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/exposure"
)

func TestExposureCommand(t *testing.T) {
	srv, err := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry(), Info: map[string]string{"node": "node-1"}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := exposure.New(exposure.Config{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	l.Record(exposure.Event{Direction: exposure.Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "shop/web-3", DstNamespace: "shop", DstEnrolled: true, Bytes: 42})
	l.Record(exposure.Event{Direction: exposure.Inbound, Src: "10.0.0.7", Dst: "shop/web-1", DstNamespace: "shop", DstEnrolled: true, Bytes: 8})
	l.Record(exposure.Event{Direction: exposure.Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "10.9.9.9", Bytes: 1})
	srv.Handle(exposure.Path, exposure.Handler(l))
	hs := httptest.NewServer(srv.AdminHandler())
	defer hs.Close()
	var buf bytes.Buffer
	stdout = &buf
	if err := runExposure([]string{"--admin", hs.URL, "--if-strict", "shop"}); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{"node node-1", "outbound   client     2            43", "inbound    shop       1            8", "shop/web-3 (enrolled)", "10.9.9.9",
		"if namespace shop were STRICT: 2 connections (50 bytes)"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	buf.Reset()
	if err := runExposure([]string{"--admin", hs.URL, "-o", "json", "--window", "5m"}); err != nil || !strings.Contains(buf.String(), `"window": "5m0s"`) {
		t.Errorf("json: %v %s", err, buf.String())
	}
	for _, bad := range [][]string{{"--window", "-1m"}, {"--top", "0"}, {"-o", "yaml"}, {"extra"}} {
		if err := runExposure(append([]string{"--admin", hs.URL}, bad...)); err == nil {
			t.Errorf("%v: want an error", bad)
		}
	}
	if err := runExposure([]string{"--admin", hs.URL, "--window", "2h"}); err == nil || !strings.Contains(err.Error(), "longer than the ledger keeps") {
		t.Errorf("2h window: %v", err)
	}
}
