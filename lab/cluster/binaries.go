package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/nodemesh/nodemesh/lab/apiserver"
)

// BinDirEnv overrides where the node binaries are taken from (make sets it
// to the cache directory it builds into).
const BinDirEnv = "NODEMESH_KUBE_NODE_DIR"

// Binaries are the upstream programs a cluster runs, built from
// lab/kube-node.
var Binaries = []string{"kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl"}

// CacheDir is where BinDir keeps the build for this Kubernetes version.
func CacheDir() (string, error) {
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("finding the user cache directory: %w", err)
	}
	return filepath.Join(dir, "nodemesh", "kube-node-"+apiserver.KubernetesVersion), nil
}

// BinDir returns a directory holding every program in Binaries:
// $NODEMESH_KUBE_NODE_DIR if set, else the cached build, building it (several
// minutes, once per version) when it is missing. `make kube-node` does the
// same build.
func BinDir(ctx context.Context) (string, error) {
	if d := os.Getenv(BinDirEnv); d != "" {
		if err := haveAll(d); err != nil {
			return "", fmt.Errorf("%s=%s: %w (run `make kube-node`)", BinDirEnv, d, err)
		}
		return d, nil
	}
	out, err := CacheDir()
	if err != nil {
		return "", err
	}
	if haveAll(out) == nil {
		return out, nil
	}
	src, err := sourceDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", fmt.Errorf("creating the cache directory: %w", err)
	}
	lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("opening the build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("locking the node binaries build: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck
	if haveAll(out) == nil {
		return out, nil
	}
	tmp := out + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", fmt.Errorf("creating %s: %w", tmp, err)
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-ldflags", ldflags(), "-o", tmp+"/", "./...")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the node binaries %s in %s: %w\n%s", apiserver.KubernetesVersion, src, err, tail(b, 4000))
	}
	_ = os.RemoveAll(out)
	if err := os.Rename(tmp, out); err != nil {
		return "", fmt.Errorf("installing the node binaries: %w", err)
	}
	return out, nil
}

// ldflags sets the version the binaries report (the Makefile's K8S_LDFLAGS):
// without it they say v0.0.0-master and version-skew checks misfire.
func ldflags() string {
	v := apiserver.KubernetesVersion
	minor := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)[1]
	f := []string{"-s", "-w"}
	for _, p := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		f = append(f, "-X", p+".gitVersion="+v, "-X", p+".gitMajor=1", "-X", p+".gitMinor="+minor, "-X", p+".gitTreeState=clean")
	}
	return strings.Join(f, " ")
}

func haveAll(dir string) error {
	for _, b := range Binaries {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return err
		}
	}
	return nil
}

// sourceDir finds lab/kube-node next to this file's source.
func sourceDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if ok {
		d := filepath.Join(filepath.Dir(file), "..", "kube-node")
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
	}
	return "", fmt.Errorf("the node binaries are not built and their source (lab/kube-node) is not here: run `make kube-node` in a nodemesh checkout or set %s", BinDirEnv)
}

// ModuleRoot is the nodemesh checkout this package was built from (for
// building images); "" when the source is not there.
func ModuleRoot() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return ""
	}
	d := filepath.Join(filepath.Dir(file), "..", "..")
	if _, err := os.Stat(filepath.Join(d, "go.mod")); err != nil {
		return ""
	}
	return d
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
