// Package labtest brings labs up for tests: each test lab gets its own ID
// (t + 5 random characters) and state directory, so tests of several
// packages, and several people on one machine, never touch each other's
// labs, and it is taken down when the test ends. Labs left by a test
// process that was killed are swept by the next Up.
package labtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/examples"
	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/lab/spec"
)

// dirPrefix starts the state directory of every test lab.
const dirPrefix = "/run/nodemesh-t"

// NewID returns a fresh test lab ID.
func NewID() string {
	const chars = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = chars[int(b[i])%len(chars)]
	}
	return "t" + string(b)
}

// Dir returns the state directory of the test lab with the given ID.
func Dir(id string) string { return "/run/nodemesh-" + id }

// Up brings up sp for the test (skipping, or failing under
// NODEMESH_REQUIRE_PRIVILEGED=1, without root) and takes it down in
// t.Cleanup, failing the test if anything is left behind.
func Up(t testing.TB, sp *spec.Spec) *lab.Lab {
	t.Helper()
	privtest.Root(t)
	SweepStale(t)
	id := NewID()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, sp, lab.Options{
		StateDir: Dir(id), ID: id,
		Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Logf("lab %s up in %s (state %s)", id, l.StartupTime().Round(time.Millisecond), l.StateDir())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := l.Down(ctx); err != nil {
			t.Errorf("lab down: %v", err)
		}
		if left, err := lab.Leftovers(id); err != nil || len(left) > 0 {
			t.Errorf("lab %s left %v (%v)", id, left, err)
		}
	})
	return l
}

// TwoNodes brings up lab/examples/two-nodes.yaml.
func TwoNodes(t testing.TB) *lab.Lab {
	t.Helper()
	sp, err := examples.TwoNodesSpec()
	if err != nil {
		t.Fatal(err)
	}
	return Up(t, sp)
}

// SweepStale takes down test labs whose creating process is gone (a test
// binary killed by a timeout or SIGKILL).
func SweepStale(t testing.TB) {
	t.Helper()
	dirs, _ := filepath.Glob(dirPrefix + "*")
	for _, d := range dirs {
		fi, err := os.Stat(d)
		if err != nil || !fi.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d, "creator"))
		if err != nil {
			// Up writes the creator first; without it the lab is either
			// being created right now or long dead.
			if time.Since(fi.ModTime()) < 10*time.Minute {
				continue
			}
		} else if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
				continue // still running
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		if err := lab.Down(ctx, d); err != nil {
			t.Logf("sweeping stale test lab %s: %v", d, err)
		}
		cancel()
	}
	// Lock files of labs that are gone, unless someone holds them.
	locks, _ := filepath.Glob(dirPrefix + "*.lock")
	for _, f := range locks {
		if _, err := os.Stat(strings.TrimSuffix(f, ".lock")); err == nil {
			continue
		}
		fh, err := os.OpenFile(f, os.O_RDWR, 0)
		if err != nil {
			continue
		}
		if syscall.Flock(int(fh.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil {
			_ = os.Remove(f)
		}
		fh.Close()
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// GoBuild builds the main package pkg (an import path or a path relative
// to the module root, e.g. "./cmd/nodemesh-agent") once per test binary
// and returns the executable, for StartNodeProcess and pod commands.
func GoBuild(t testing.TB, pkg string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[pkg]; ok {
		return p
	}
	root, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(root)) == "" || strings.TrimSpace(string(root)) == os.DevNull {
		t.Fatalf("finding the module root for building %s: %v", pkg, err)
	}
	// A cache directory, not t.TempDir: the binary may outlive this test
	// (later tests of this binary reuse it) and must be executable by the
	// processes the lab starts. Build to a temporary name and rename, so
	// concurrent test binaries never run a half-written file.
	cache, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	// One directory per module root, so test runs of two checkouts (git
	// worktrees, a CI clone beside a working copy) never run each other's
	// binaries.
	sum := sha256.Sum256([]byte(strings.TrimSpace(string(root))))
	dir := filepath.Join(cache, "nodemesh", "labtest-bin", hex.EncodeToString(sum[:6]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	tmp, err := os.CreateTemp(dir, filepath.Base(pkg)+".tmp-")
	if err != nil {
		t.Fatal(err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	cmd := exec.Command("go", "build", "-o", tmp.Name(), pkg)
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(root)))
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		t.Fatal(err)
	}
	built[pkg] = out
	return out
}

var (
	buildMu sync.Mutex
	built   = map[string]string{}
)

// APIServer starts a real etcd + kube-apiserver (no lab network) for a test
// that only needs the Kubernetes API, and stops it when the test ends.
// Without the kube-apiserver build or etcd it skips, or fails when
// privileged tests are required (privtest).
func APIServer(ctx context.Context, t testing.TB) *apiserver.Server {
	t.Helper()
	bin, err := apiserver.Binary(ctx)
	if err != nil {
		privtest.Skip(t, "kube-apiserver unavailable: "+err.Error())
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		privtest.Skip(t, "etcd not installed (apt-get install etcd-server)")
	}
	srv, err := apiserver.Start(ctx, apiserver.Config{Dir: t.TempDir(), Binary: bin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Stop() })
	return srv
}
