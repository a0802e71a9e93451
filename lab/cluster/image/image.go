// Package image builds the container images of nodemesh without a Docker
// engine: static Go binaries (CGO_ENABLED=0) in a single layer on an empty
// base, written with go-containerregistry as one image archive that
// `ctr -n k8s.io images import` loads into a node's containerd (make image,
// and the cluster tier, lab/cluster).
//
// The images mirror manifests/Dockerfile (same paths, entrypoints and
// users) minus the distroless base, which cannot be pulled here; the
// binaries are static and need nothing from it.
package image

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Registry prefixes every image name: "localhost/" is never pulled from.
const Registry = "localhost/"

// Pause is the sandbox image the cluster tier's containerd is configured
// with (sandbox_image), built from lab/cluster/pause.
const Pause = Registry + "nodemesh-pause:1"

// Image is one single-binary image.
type Image struct {
	// Ref is the image name with tag, e.g. localhost/nodemesh-agent:dev.
	Ref string
	// Package is the Go main package to build, relative to the module
	// root, e.g. ./cmd/nodemesh-agent.
	Package string
	// File is a static binary to take as it is instead of building
	// Package (Debian's busybox-static for the uninstall cleanup).
	File string
	// LDFlags are passed to go build (e.g. the version stamp).
	LDFlags string
	// Links are more names of the binary (symbolic links), e.g. /bin/rm
	// for busybox.
	Links []string
	// Extras are more Go binaries in the image (the agent image carries
	// the CNI plugin it installs on its node).
	Extras []Extra
	// Entrypoint is the image's entrypoint; its first element is where
	// the binary goes.
	Entrypoint []string
	// User is the image's default user ("uid:gid").
	User string
}

// Extra is one more binary of an image: Package built to Path.
type Extra struct {
	Package, Path string
}

// Nodemesh returns the images of a nodemesh install with tag: the agent,
// the CA, the sandbox image and the workload image (nodemeshctl's built-in
// lab workloads, for test pods).
func Nodemesh(tag string) []Image {
	return []Image{
		{Ref: Registry + "nodemesh-agent:" + tag, Package: "./cmd/nodemesh-agent", Entrypoint: []string{"/usr/local/bin/nodemesh-agent"}, User: "0:0",
			Extras: []Extra{{Package: "./cmd/nodemesh-cni", Path: "/usr/local/bin/nodemesh-cni"}}},
		{Ref: Registry + "nodemesh-ca:" + tag, Package: "./cmd/nodemesh-ca", Entrypoint: []string{"/usr/local/bin/nodemesh-ca"}, User: "65532:65532"},
		{Ref: Registry + "nodemesh-workload:" + tag, Package: "./cmd/nodemeshctl", Entrypoint: []string{"/usr/local/bin/nodemeshctl", "lab", "workload"}, User: "65532:65532"},
		{Ref: Pause, Package: "./lab/cluster/pause", Entrypoint: []string{"/pause"}, User: "65535:65535"},
	}
}

// Build compiles every image's binary from the module at moduleRoot and
// writes all images to one archive at out (docker-archive format with the
// names as repo tags, which ctr imports). Log receives progress; nil
// discards it.
func Build(ctx context.Context, moduleRoot, out string, imgs []Image, log io.Writer) error {
	if log == nil {
		log = io.Discard
	}
	tmp, err := os.MkdirTemp("", "nodemesh-image-")
	if err != nil {
		return fmt.Errorf("creating a build directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	refs := map[name.Reference]v1.Image{}
	for _, im := range imgs {
		if len(im.Entrypoint) == 0 || !strings.HasPrefix(im.Entrypoint[0], "/") {
			return fmt.Errorf("image %s: the entrypoint must start with the binary's absolute path", im.Ref)
		}
		ref, err := name.NewTag(im.Ref, name.StrictValidation)
		if err != nil {
			return fmt.Errorf("image name %q: %w", im.Ref, err)
		}
		bin := im.File
		start := time.Now()
		build := func(pkg, out string) error {
			cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w "+im.LDFlags, "-o", out, pkg)
			cmd.Dir = moduleRoot
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
			if b, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("building %s for image %s: %w\n%s", pkg, im.Ref, err, b)
			}
			return nil
		}
		if bin == "" {
			bin = filepath.Join(tmp, filepath.Base(im.Entrypoint[0]))
			if err := build(im.Package, bin); err != nil {
				return err
			}
		}
		extras := map[string]string{}
		for _, e := range im.Extras {
			if !strings.HasPrefix(e.Path, "/") {
				return fmt.Errorf("image %s: extra binary path %q must be absolute", im.Ref, e.Path)
			}
			out := filepath.Join(tmp, "extra-"+filepath.Base(e.Path))
			if err := build(e.Package, out); err != nil {
				return err
			}
			extras[e.Path] = out
		}
		img, err := fromFiles(bin, extras, im.Entrypoint, im.User, im.Links...)
		if err != nil {
			return fmt.Errorf("image %s: %w", im.Ref, err)
		}
		refs[ref] = img
		fmt.Fprintf(log, "image %s: %s built in %s\n", im.Ref, im.Package+im.File, time.Since(start).Round(time.Millisecond))
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return fmt.Errorf("creating the image directory: %w", err)
	}
	part := out + ".tmp"
	if err := tarball.MultiRefWriteToFile(part, refs); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	if err := os.Rename(part, out); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	return nil
}

// Busybox is the image of Debian's static busybox (package busybox-static)
// under the name the cluster overlay of manifests/uninstall uses: the
// uninstall cleanup needs a shell, and docker.io cannot be pulled here.
func Busybox() Image {
	return Image{
		Ref: Registry + "busybox:debian", File: "/bin/busybox", Entrypoint: []string{"/bin/busybox"}, User: "0:0",
		Links: []string{"/bin/sh", "/bin/rm", "/bin/test", "/bin/echo", "/bin/sleep", "/bin/ls", "/bin/cat"},
	}
}

// FromBinary returns an image with the file bin at entrypoint[0] (mode
// 0755, owned by root) and symbolic links to it at links, that
// entrypoint, user and a PATH, for this machine's architecture.
// Timestamps are zero so equal binaries give equal images.
func FromBinary(bin string, entrypoint []string, user string, links ...string) (v1.Image, error) {
	return fromFiles(bin, nil, entrypoint, user, links...)
}

// fromFiles is FromBinary with more binaries: extras maps each one's path
// in the image to the file on disk.
func fromFiles(bin string, extras map[string]string, entrypoint []string, user string, links ...string) (v1.Image, error) {
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("reading the binary: %w", err)
	}
	extraPaths := slices.Sorted(maps.Keys(extras))
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	target := strings.TrimPrefix(entrypoint[0], "/")
	// Parent directories first, so the runtime creates them with sane modes.
	seen := map[string]bool{}
	var dirs []string
	for _, p := range append(append([]string{target}, links...), extraPaths...) {
		var chain []string
		for d := filepath.Dir(strings.TrimPrefix(p, "/")); d != "." && d != "/"; d = filepath.Dir(d) {
			chain = append([]string{d}, chain...)
		}
		for _, d := range chain {
			if !seen[d] {
				seen[d] = true
				dirs = append(dirs, d)
			}
		}
	}
	for _, d := range append(dirs, "tmp") {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("writing the layer: %w", err)
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: target, Mode: 0o755, Size: int64(len(data)), Format: tar.FormatPAX}); err != nil {
		return nil, fmt.Errorf("writing the layer: %w", err)
	}
	if _, err := tw.Write(data); err != nil {
		return nil, fmt.Errorf("writing the layer: %w", err)
	}
	for _, p := range extraPaths {
		b, err := os.ReadFile(extras[p])
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", extras[p], err)
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(p, "/"), Mode: 0o755, Size: int64(len(b)), Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("writing the layer: %w", err)
		}
		if _, err := tw.Write(b); err != nil {
			return nil, fmt.Errorf("writing the layer: %w", err)
		}
	}
	for _, l := range links {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: strings.TrimPrefix(l, "/"), Linkname: entrypoint[0], Mode: 0o777, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("writing the layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("writing the layer: %w", err)
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("building the layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, fmt.Errorf("adding the layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("reading the image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config.Entrypoint = entrypoint
	cf.Config.User = user
	cf.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	cf.Config.WorkingDir = "/"
	return mutate.ConfigFile(img, cf)
}
