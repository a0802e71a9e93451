package cni

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestNamespaceTableRoundTrip(t *testing.T) {
	path := NamespaceTablePath(filepath.Join(t.TempDir(), "cni.sock"))
	if filepath.Base(path) != NamespaceTableName {
		t.Fatalf("table path %s", path)
	}
	in := NamespaceTable{Written: time.Unix(1700000000, 0).UTC(), Meshed: []string{"shop", "bank"}, Unmeshed: []string{"tools", "default"}}
	if err := WriteNamespaceTable(path, in); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("table mode %v, err %v; want 0600", st.Mode().Perm(), err)
	}
	got, err := ReadNamespaceTable(path)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Written.Equal(in.Written) || strings.Join(got.Meshed, ",") != "bank,shop" || strings.Join(got.Unmeshed, ",") != "default,tools" {
		t.Fatalf("read back %+v", got)
	}
	for ns, want := range map[string]bool{"default": true, "tools": true, "shop": false, "bank": false, "new": false, "": false} {
		if got.IsUnmeshed(ns) != want {
			t.Errorf("IsUnmeshed(%q) = %v, want %v", ns, !want, want)
		}
	}
	if !got.Equal(&NamespaceTable{Meshed: []string{"bank", "shop"}, Unmeshed: []string{"default", "tools"}}) {
		t.Error("Equal: same lists, other time: want equal")
	}
	if got.Equal(&NamespaceTable{Meshed: []string{"bank", "shop", "tools"}, Unmeshed: []string{"default"}}) {
		t.Error("Equal: a namespace changed mode: want different")
	}
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 1 {
		t.Errorf("files beside the table: %v (temporary file left?)", ents)
	}
}

func TestNamespaceTableRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	if err := WriteNamespaceTable(filepath.Join(dir, "w.json"), NamespaceTable{Meshed: []string{"a"}, Unmeshed: []string{"a"}}); err == nil {
		t.Error("wrote a table listing a namespace both meshed and unmeshed")
	}
	if err := WriteNamespaceTable(filepath.Join(dir, "w.json"), NamespaceTable{Meshed: []string{""}}); err == nil {
		t.Error("wrote a table with an empty name")
	}
	huge := `{"version":1,"unmeshed":["` + strings.Repeat("a", maxNamespaceTable) + `"]}`
	for name, tc := range map[string]struct{ body, msg string }{
		"not JSON":          {`{"version":1,`, "decoding"},
		"other version":     {`{"version":2,"unmeshed":["a"]}`, "format version 2"},
		"no version":        {`{"unmeshed":["a"]}`, "format version 0"},
		"unsorted":          {`{"version":1,"unmeshed":["b","a"]}`, "not sorted"},
		"repeated":          {`{"version":1,"unmeshed":["a","a"]}`, "repeated"},
		"both lists":        {`{"version":1,"meshed":["a"],"unmeshed":["a"]}`, "both"},
		"empty name":        {`{"version":1,"unmeshed":[""]}`, "empty"},
		"larger than limit": {huge, "larger than"},
	} {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".json")
			if err := os.WriteFile(p, []byte(tc.body), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := ReadNamespaceTable(p); err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err %v, want %q", err, tc.msg)
			}
		})
	}
	if _, err := ReadNamespaceTable(filepath.Join(dir, "missing.json")); !os.IsNotExist(err) {
		t.Errorf("missing table: %v", err)
	}
}
