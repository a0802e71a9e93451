package cni

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const bridgeList = `{
  "cniVersion": "0.4.0",
  "name": "cluster",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

func installDirs(t *testing.T) InstallConfig {
	t.Helper()
	d := t.TempDir()
	cfg := InstallConfig{Plugin: filepath.Join(d, "src", PluginType), BinDir: filepath.Join(d, "bin"), ConfDir: filepath.Join(d, "net.d"),
		Socket: "/var/run/nodemesh/cni.sock", ExcludeNamespaces: []string{"kube-system", "nodemesh-system"}}
	for _, dir := range []string{filepath.Dir(cfg.Plugin), cfg.BinDir, cfg.ConfDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(cfg.Plugin, []byte("#!plugin v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func plugins(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var l struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &l); err != nil {
		t.Fatalf("%s is not a conflist: %v\n%s", path, err, b)
	}
	if l.CNIVersion == "" || l.Name == "" {
		t.Fatalf("%s lost its cniVersion or name:\n%s", path, b)
	}
	return l.Plugins
}

func TestInstallChainsIdempotentlyAndUninstalls(t *testing.T) {
	cfg := installDirs(t)
	if _, err := Install(cfg); !errors.Is(err, ErrNoNetworkConfig) {
		t.Fatalf("Install without a network configuration: %v", err)
	}
	conf := filepath.Join(cfg.ConfDir, "10-cluster.conflist")
	if err := os.WriteFile(conf, []byte(bridgeList), 0o644); err != nil {
		t.Fatal(err)
	}
	// A later file is not the runtime's: left alone.
	other := filepath.Join(cfg.ConfDir, "99-other.conflist")
	if err := os.WriteFile(other, []byte(bridgeList), 0o644); err != nil {
		t.Fatal(err)
	}
	file, err := Install(cfg)
	if err != nil || file != conf {
		t.Fatalf("Install = %q, %v", file, err)
	}
	ps := plugins(t, conf)
	if len(ps) != 3 || ps[0]["type"] != "bridge" || ps[1]["type"] != "portmap" || ps[2]["type"] != PluginType ||
		ps[2]["socket"] != cfg.Socket || len(ps[2]["excludeNamespaces"].([]any)) != 2 {
		t.Fatalf("plugins after Install: %v", ps)
	}
	if b, _ := os.ReadFile(filepath.Join(cfg.BinDir, PluginType)); string(b) != "#!plugin v1" {
		t.Fatalf("plugin binary %q", b)
	}
	if st, _ := os.Stat(filepath.Join(cfg.BinDir, PluginType)); st.Mode().Perm() != 0o755 {
		t.Fatalf("plugin mode %v", st.Mode())
	}
	if ok, err := Installed(cfg); !ok || err != nil {
		t.Fatalf("Installed = %v, %v", ok, err)
	}
	// Again: nothing changes (not even the file's identity).
	st1, _ := os.Stat(conf)
	if _, err := Install(cfg); err != nil {
		t.Fatal(err)
	}
	st2, _ := os.Stat(conf)
	if !os.SameFile(st1, st2) {
		t.Fatal("a second Install rewrote an unchanged configuration")
	}
	if len(plugins(t, conf)) != 3 {
		t.Fatal("a second Install added another entry")
	}
	// A new plugin version and another socket: replaced in place.
	cfg.Socket = "/run/nodemesh/other.sock"
	if err := os.WriteFile(cfg.Plugin, []byte("#!plugin v2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(cfg); err != nil {
		t.Fatal(err)
	}
	if ps := plugins(t, conf); len(ps) != 3 || ps[2]["socket"] != cfg.Socket {
		t.Fatalf("plugins after reinstall: %v", ps)
	}
	if b, _ := os.ReadFile(filepath.Join(cfg.BinDir, PluginType)); string(b) != "#!plugin v2" {
		t.Fatalf("plugin binary not updated: %q", b)
	}
	// The network plugin rewrites its configuration: installed again.
	if err := os.WriteFile(conf, []byte(bridgeList), 0o644); err != nil {
		t.Fatal(err)
	}
	if ok, _ := Installed(cfg); ok {
		t.Fatal("Installed after the entry was lost")
	}
	if _, err := Install(cfg); err != nil {
		t.Fatal(err)
	}
	if ps := plugins(t, conf); len(ps) != 3 {
		t.Fatalf("plugins after the rewrite: %v", ps)
	}
	// The hold mode goes into the entry.
	cfg.HoldWhenAgentDown = HoldAll
	if _, err := Install(cfg); err != nil {
		t.Fatal(err)
	}
	if ps := plugins(t, conf); len(ps) != 3 || ps[2]["holdWhenAgentDown"] != HoldAll {
		t.Fatalf("plugins after setting holdWhenAgentDown: %v", ps)
	}
	// A stale socket, the namespace table and everything else go with
	// Uninstall.
	sock := filepath.Join(t.TempDir(), "cni.sock")
	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	table := NamespaceTablePath(sock)
	if err := WriteNamespaceTable(table, NamespaceTable{Unmeshed: []string{"default"}}); err != nil {
		t.Fatal(err)
	}
	cfg.Socket = sock
	if err := Uninstall(cfg); err != nil {
		t.Fatal(err)
	}
	if ps := plugins(t, conf); len(ps) != 2 || ps[1]["type"] != "portmap" {
		t.Fatalf("plugins after Uninstall: %v", ps)
	}
	for _, p := range []string{filepath.Join(cfg.BinDir, PluginType), sock, table} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after Uninstall", p)
		}
	}
	if b, _ := os.ReadFile(other); string(b) != bridgeList {
		t.Error("Uninstall touched a configuration without the entry")
	}
	// Twice is fine.
	if err := Uninstall(cfg); err != nil {
		t.Fatalf("second Uninstall: %v", err)
	}
	ents, _ := os.ReadDir(cfg.ConfDir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file %s left", e.Name())
		}
	}
}

func TestInstallConvertsSingleConf(t *testing.T) {
	cfg := installDirs(t)
	conf := filepath.Join(cfg.ConfDir, "10-bridge.conf")
	if err := os.WriteFile(conf, []byte(`{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	file, err := Install(cfg)
	if err != nil || file != filepath.Join(cfg.ConfDir, "10-bridge.conflist") {
		t.Fatalf("Install = %q, %v", file, err)
	}
	if _, err := os.Stat(conf); !errors.Is(err, os.ErrNotExist) {
		t.Error("the .conf was left beside its .conflist (the runtime would load the .conf first)")
	}
	if ps := plugins(t, file); len(ps) != 2 || ps[0]["type"] != "bridge" || ps[0]["bridge"] != "cni0" || ps[1]["type"] != PluginType {
		t.Fatalf("plugins %v", ps)
	}
}

func TestInstallRefusesBadConfig(t *testing.T) {
	for name, body := range map[string]string{
		"not JSON":          `{"cniVersion":`,
		"no plugins":        `{"cniVersion":"1.0.0","name":"x","plugins":[]}`,
		"only ours":         `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"nodemesh-cni"}]}`,
		"plugins not array": `{"cniVersion":"1.0.0","name":"x","plugins":{}}`,
	} {
		t.Run(name, func(t *testing.T) {
			cfg := installDirs(t)
			conf := filepath.Join(cfg.ConfDir, "10-x.conflist")
			if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := Install(cfg); err == nil {
				t.Fatal("Install accepted it")
			}
			if b, _ := os.ReadFile(conf); string(b) != body {
				t.Fatal("a configuration Install refused was changed")
			}
		})
	}
}
