package image

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

func TestFromBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "prog")
	if err := os.WriteFile(bin, []byte("\x7fELF not really"), 0o600); err != nil {
		t.Fatal(err)
	}
	img, err := FromBinary(bin, []string{"/usr/local/bin/prog", "serve"}, "65532:65532", "/bin/sh")
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Config.User != "65532:65532" || len(cf.Config.Entrypoint) != 2 || cf.Config.Entrypoint[0] != "/usr/local/bin/prog" {
		t.Errorf("config: os %q user %q entrypoint %q", cf.OS, cf.Config.User, cf.Config.Entrypoint)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	got := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			got[h.Name] = "dir"
		case tar.TypeSymlink:
			got[h.Name] = "-> " + h.Linkname
		case tar.TypeReg:
			b, _ := io.ReadAll(tr)
			if h.Mode != 0o755 || h.Uid != 0 {
				t.Errorf("%s: mode %o uid %d, want 0755 root", h.Name, h.Mode, h.Uid)
			}
			got[h.Name] = string(b)
		}
	}
	want := map[string]string{
		"usr/": "dir", "usr/local/": "dir", "usr/local/bin/": "dir", "bin/": "dir", "tmp/": "dir",
		"usr/local/bin/prog": "\x7fELF not really", "bin/sh": "-> /usr/local/bin/prog",
	}
	var names []string
	for n := range got {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(got) != len(want) {
		t.Errorf("layer holds %q, want %v", names, want)
	}
	for n, w := range want {
		if got[n] != w {
			t.Errorf("%s: %q, want %q", n, got[n], w)
		}
	}
}

func TestBuildRefusesRelativeEntrypoint(t *testing.T) {
	err := Build(t.Context(), ".", filepath.Join(t.TempDir(), "x.tar"), []Image{{Ref: "localhost/x:1", Package: ".", Entrypoint: []string{"x"}}}, nil)
	if err == nil {
		t.Fatal("Build accepted a relative entrypoint")
	}
}

func TestFromFilesExtras(t *testing.T) {
	dir := t.TempDir()
	bin, plugin := filepath.Join(dir, "agent"), filepath.Join(dir, "plugin")
	for f, body := range map[string]string{bin: "agent", plugin: "plugin"} {
		if err := os.WriteFile(f, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	img, err := fromFiles(bin, map[string]string{"/usr/local/bin/nodemesh-cni": plugin}, []string{"/usr/local/bin/nodemesh-agent"}, "0:0")
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			b, _ := io.ReadAll(tr)
			files[h.Name] = string(b)
		}
	}
	if files["usr/local/bin/nodemesh-agent"] != "agent" || files["usr/local/bin/nodemesh-cni"] != "plugin" || len(files) != 2 {
		t.Fatalf("files %v", files)
	}
}
