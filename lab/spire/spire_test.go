package spire

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestMakefileVersion keeps the Makefile's SPIRE build and Version equal:
// the lab test would otherwise look for binaries make never builds.
func TestMakefileVersion(t *testing.T) {
	b, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^SPIRE_VERSION\s*:=\s*(\S+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the Makefile sets no SPIRE_VERSION")
	}
	if string(m[1]) != Version {
		t.Errorf("the Makefile builds SPIRE %s, lab/spire expects %s", m[1], Version)
	}
}

func TestBinDir(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(BinDirEnv, dir)
	_, err := BinDir()
	if err == nil || !strings.Contains(err.Error(), "make spire") || !strings.Contains(err.Error(), BinDirEnv) {
		t.Fatalf("BinDir with an empty directory: %v, want an error that says to run make spire", err)
	}
	for _, b := range []string{ServerProcess, AgentProcess} {
		if err := os.WriteFile(filepath.Join(dir, b), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := BinDir(); err != nil || got != dir {
		t.Fatalf("BinDir: %q, %v; want %q", got, err, dir)
	}
	if err := os.Chmod(filepath.Join(dir, AgentProcess), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := BinDir(); err == nil || !strings.Contains(err.Error(), "not an executable") {
		t.Fatalf("BinDir with a non-executable spire-agent: %v", err)
	}
}

func TestProcessSelectors(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "nodemesh-agent")
	if err := os.WriteFile(bin, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(bin, link); err != nil {
		t.Fatal(err)
	}
	sel, err := ProcessSelectors(link)
	if err != nil {
		t.Fatal(err)
	}
	resolved, _ := filepath.EvalSymlinks(bin)
	if len(sel) != 2 || !strings.HasPrefix(sel[0], "unix:uid:") || sel[1] != "unix:path:"+resolved {
		t.Errorf("selectors %v, want the uid and the resolved path %s", sel, resolved)
	}
	if _, err := ProcessSelectors(filepath.Join(dir, "missing")); err == nil {
		t.Error("selectors for a missing binary")
	}
}
