package main

import (
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
	out, errOut, code := ctl(t, "exposure", "--admin", hs.URL, "--if-strict", "shop")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{"node node-1", "outbound   client     2            43", "inbound    shop       1            8", "shop/web-3 (enrolled)", "10.9.9.9",
		"if namespace shop were STRICT: 2 connections (50 bytes)"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if out, errOut, code := ctl(t, "exposure", "--admin", hs.URL, "-o", "json", "--window", "5m"); code != 0 || !strings.Contains(out, `"window": "5m0s"`) {
		t.Errorf("json: exit %d %s %s", code, errOut, out)
	}
	for _, bad := range [][]string{{"--window", "-1m"}, {"--top", "0"}, {"-o", "xml"}, {"extra"}} {
		if _, _, code := ctl(t, append([]string{"exposure", "--admin", hs.URL}, bad...)...); code != 2 {
			t.Errorf("%v: exit %d, want 2", bad, code)
		}
	}
	if _, errOut, code := ctl(t, "exposure", "--admin", hs.URL, "--window", "2h"); code != 1 || !strings.Contains(errOut, "longer than the ledger keeps") {
		t.Errorf("2h window: exit %d %s", code, errOut)
	}
}
