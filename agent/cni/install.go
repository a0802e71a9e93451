package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// PluginType is the plugin's "type" in a conflist, and its binary's name
// in the CNI bin directory.
const PluginType = "nodemesh-cni"

// InstallConfig says where the node's CNI configuration and plugins are,
// as the agent sees them (hostPath mounts), and what the plugin's entry
// holds.
type InstallConfig struct {
	// Plugin is the plugin binary to copy (in the agent's image).
	Plugin string
	// BinDir and ConfDir are the node's CNI bin and configuration
	// directories (/opt/cni/bin and /etc/cni/net.d on most nodes).
	BinDir, ConfDir string
	// Socket is the agent's socket as the plugin on the node sees it.
	Socket string
	// ExcludeNamespaces are never held back (the plugin's
	// excludeNamespaces).
	ExcludeNamespaces []string
	// Timeout is the plugin's wait for the agent ("" = its default).
	Timeout time.Duration
	// HoldWhenAgentDown is the plugin's holdWhenAgentDown (HoldMeshed,
	// HoldAll; "" = the plugin's default, HoldMeshed).
	HoldWhenAgentDown string
	Log               *slog.Logger
}

// ErrNoNetworkConfig: the node has no CNI configuration yet to chain to
// (the pod network's plugin has not written it); Install is retried.
var ErrNoNetworkConfig = errors.New("no CNI network configuration to chain to yet")

// Install copies the plugin into BinDir and makes it the last plugin of
// the node's network configuration (the first file by name in ConfDir, the
// one the container runtime loads), replacing an entry of an earlier
// install. A single-plugin .conf becomes a .conflist. It is idempotent:
// with everything in place it writes nothing. It returns the file it
// changed or checked.
func Install(cfg InstallConfig) (string, error) {
	if err := installBinary(cfg.Plugin, filepath.Join(cfg.BinDir, PluginType)); err != nil {
		return "", err
	}
	file, err := primaryConfig(cfg.ConfDir)
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("reading the CNI configuration: %w", err)
	}
	entry, err := json.Marshal(entryOf(cfg))
	if err != nil {
		return "", fmt.Errorf("encoding the plugin's entry: %w", err)
	}
	out, changed, err := chain(b, strings.HasSuffix(file, ".conflist"), entry)
	if err != nil {
		return "", fmt.Errorf("chaining nodemesh-cni into %s: %w", file, err)
	}
	if !changed {
		return file, nil
	}
	target := file
	if !strings.HasSuffix(file, ".conflist") {
		target = strings.TrimSuffix(file, filepath.Ext(file)) + ".conflist"
	}
	if err := writeAtomic(target, out, 0o644); err != nil {
		return "", err
	}
	if target != file {
		if err := os.Remove(file); err != nil {
			return "", fmt.Errorf("removing %s, now %s: %w", file, target, err)
		}
	}
	return target, nil
}

// Uninstall removes the plugin's entry from every configuration in
// ConfDir, the plugin binary, and a socket and namespace table left beside
// Socket. Missing pieces are not an error: it also cleans up after a
// partial install.
func Uninstall(cfg InstallConfig) error {
	var errs []error
	ents, err := os.ReadDir(cfg.ConfDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("listing the CNI configuration: %w", err))
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || !strings.HasSuffix(e.Name(), ".conflist") {
			continue
		}
		p := filepath.Join(cfg.ConfDir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("reading %s: %w", p, err))
			continue
		}
		out, changed, err := chain(b, true, nil)
		if err != nil || !changed {
			continue // not ours to judge
		}
		if err := writeAtomic(p, out, 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	rm := []string{filepath.Join(cfg.BinDir, PluginType)}
	if cfg.Socket != "" {
		rm = append(rm, cfg.Socket, NamespaceTablePath(cfg.Socket))
	}
	for _, p := range rm {
		if p == PluginType {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// Installed reports whether the plugin is chained in ConfDir's primary
// configuration and its binary is in BinDir.
func Installed(cfg InstallConfig) (bool, error) {
	if _, err := os.Stat(filepath.Join(cfg.BinDir, PluginType)); err != nil {
		return false, nil
	}
	file, err := primaryConfig(cfg.ConfDir)
	if err != nil {
		return false, err
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return false, err
	}
	_, plugins, err := decodeList(b, strings.HasSuffix(file, ".conflist"))
	if err != nil {
		return false, err
	}
	return len(plugins) > 0 && pluginType(plugins[len(plugins)-1]) == PluginType, nil
}

// KeepInstalled installs and then checks every interval until ctx ends,
// installing again when the network plugin rewrote its configuration
// without the entry (or none existed yet).
func KeepInstalled(ctx context.Context, cfg InstallConfig, interval time.Duration) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var last string
	for {
		file, err := Install(cfg)
		switch {
		case err != nil && err.Error() != last:
			log.Warn("installing the nodemesh CNI plugin; until it is in place, new pods may start before their capture", "err", err)
			last = err.Error()
		case err == nil && last != "ok:"+file:
			log.Info("nodemesh CNI plugin installed", "conf", file, "bin", filepath.Join(cfg.BinDir, PluginType))
			last = "ok:" + file
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// entryOf is the plugin's conflist entry.
func entryOf(cfg InstallConfig) map[string]any {
	e := map[string]any{"type": PluginType, "socket": cfg.Socket}
	if len(cfg.ExcludeNamespaces) > 0 {
		e["excludeNamespaces"] = cfg.ExcludeNamespaces
	}
	if cfg.Timeout > 0 {
		e["timeout"] = cfg.Timeout.String()
	}
	if cfg.HoldWhenAgentDown != "" {
		e["holdWhenAgentDown"] = cfg.HoldWhenAgentDown
	}
	return e
}

// primaryConfig returns the configuration file the runtime loads: the
// first .conflist, .conf or .json in dir by name (libcni's order).
func primaryConfig(dir string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("listing the CNI configuration directory %s: %w", dir, err)
	}
	var names []string
	for _, e := range ents {
		switch filepath.Ext(e.Name()) {
		case ".conflist", ".conf", ".json":
			if !e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				names = append(names, e.Name())
			}
		}
	}
	if len(names) == 0 {
		return "", fmt.Errorf("%w in %s", ErrNoNetworkConfig, dir)
	}
	slices.Sort(names)
	return filepath.Join(dir, names[0]), nil
}

// decodeList returns a configuration's top-level fields and its plugins
// (a single-plugin .conf is a list of one).
func decodeList(b []byte, isList bool) (map[string]json.RawMessage, []json.RawMessage, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return nil, nil, fmt.Errorf("decoding: %w", err)
	}
	if top == nil {
		return nil, nil, errors.New("not a JSON object")
	}
	if !isList {
		conf := bytes.TrimSpace(b)
		list := map[string]json.RawMessage{}
		for _, k := range []string{"cniVersion", "name"} {
			if v, ok := top[k]; ok {
				list[k] = v
			}
		}
		return list, []json.RawMessage{conf}, nil
	}
	var plugins []json.RawMessage
	if raw, ok := top["plugins"]; ok {
		if err := json.Unmarshal(raw, &plugins); err != nil {
			return nil, nil, fmt.Errorf("decoding plugins: %w", err)
		}
	}
	if len(plugins) == 0 {
		return nil, nil, errors.New("the list has no plugins")
	}
	return top, plugins, nil
}

func pluginType(raw json.RawMessage) string {
	var p struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(raw, &p)
	return p.Type
}

// chain returns the configuration with entry as its last plugin and no
// other nodemesh-cni entry (entry nil: none at all), and whether that
// differs from b.
func chain(b []byte, isList bool, entry json.RawMessage) ([]byte, bool, error) {
	top, plugins, err := decodeList(b, isList)
	if err != nil {
		return nil, false, err
	}
	var kept []json.RawMessage
	for _, p := range plugins {
		if pluginType(p) != PluginType {
			kept = append(kept, p)
		}
	}
	if len(kept) == 0 {
		return nil, false, errors.New("no network plugin to chain after")
	}
	if entry != nil {
		kept = append(kept, entry)
	}
	if isList && len(kept) == len(plugins) && (entry == nil || bytes.Equal(compact(plugins[len(plugins)-1]), compact(entry))) {
		return b, false, nil
	}
	pl, err := json.Marshal(kept)
	if err != nil {
		return nil, false, err
	}
	top["plugins"] = pl
	out, err := json.MarshalIndent(top, "", "  ")
	if err != nil {
		return nil, false, err
	}
	return append(out, '\n'), true, nil
}

func compact(b []byte) []byte {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return b
	}
	return buf.Bytes()
}

// installBinary copies src to dst through a temporary file and a rename,
// so the runtime never runs a half-written plugin; an identical dst is
// left alone.
func installBinary(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("reading the plugin binary: %w", err)
	}
	if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, data) {
		return nil
	}
	return writeAtomic(dst, data, 0o755)
}

func writeAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = io.Copy(f, bytes.NewReader(data))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, mode)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
