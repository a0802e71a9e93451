package cluster_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/lab/cluster"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

// newID returns a fresh cluster ID: "c" and five random characters.
func newID() string {
	const chars = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = chars[int(b[i])%len(chars)]
	}
	return "c" + string(b)
}

// sweepStale removes clusters of test processes that were killed.
func sweepStale(t *testing.T) {
	dirs, _ := filepath.Glob("/var/tmp/nodemesh-c*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "creator"))
		if err == nil {
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				continue // detached (nodemeshctl cluster up): its user takes it down
			}
			if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
				continue
			}
		} else if fi, err := os.Stat(d); err != nil || time.Since(fi.ModTime()) < 10*time.Minute {
			continue
		}
		id := strings.TrimPrefix(filepath.Base(d), "nodemesh-")
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		if err := cluster.Sweep(ctx, id, d); err != nil {
			t.Logf("sweeping stale cluster %s: %v", d, err)
		}
		cancel()
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// keepLogs copies the cluster's logs out of its state directory (which
// Down removes) for a failed test.
func keepLogs(t *testing.T, dir string) {
	dst := filepath.Join(os.TempDir(), "nodemesh-cluster-logs-"+filepath.Base(dir))
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && (d.Name() == "var-lib" || d.Name() == "run" || d.Name() == "etcd") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".log") {
			rel, _ := filepath.Rel(dir, p)
			b, _ := os.ReadFile(p)
			_ = os.MkdirAll(filepath.Dir(filepath.Join(dst, rel)), 0o755)
			_ = os.WriteFile(filepath.Join(dst, rel), b, 0o644)
		}
		return nil
	})
	t.Logf("cluster logs kept in %s", dst)
}

// kubectl runs kubectl against c with stdin and returns its output,
// failing the test on error.
func kubectl(t *testing.T, c *cluster.Cluster, stdin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := c.Kubectl(ctx, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// TestClusterBringUp brings up one real node (kubelet, containerd, CNI,
// kube-proxy) with the controller manager and scheduler, checks it is
// Ready with the versions it reports, and sweeps it as after a crash.
func TestClusterBringUp(t *testing.T) {
	privtest.Root(t)
	sweepStale(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	bins, err := cluster.BinDir(ctx)
	if err != nil {
		t.Fatal(err)
	}
	id := newID()
	dir := cluster.DefaultStateDir(id)
	start := time.Now()
	c, err := cluster.Up(ctx, cluster.Options{ID: id, Nodes: 1, BinDir: bins, Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatalf("cluster up: %v", err)
	}
	t.Logf("cluster %s up with 1 node in %s", id, time.Since(start).Round(time.Millisecond))
	defer func() {
		if t.Failed() {
			keepLogs(t, dir)
		}
		if err := cluster.Sweep(context.Background(), id, dir); err != nil {
			t.Errorf("cluster sweep: %v", err)
		}
		if left, err := cluster.Leftovers(id, dir); err != nil || len(left) > 0 {
			t.Errorf("cluster %s left %v (%v)", id, left, err)
		}
	}()
	t.Log(kubectl(t, c, "", "get", "nodes", "-o", "wide"))
	n, err := c.Server.Client.CoreV1().Nodes().Get(ctx, "node1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node1: kubelet %s, runtime %s, kernel %s, pod CIDR %s", n.Status.NodeInfo.KubeletVersion, n.Status.NodeInfo.ContainerRuntimeVersion, n.Status.NodeInfo.KernelVersion, n.Spec.PodCIDR)
	if !strings.HasPrefix(n.Status.NodeInfo.ContainerRuntimeVersion, "containerd://1.") || n.Status.NodeInfo.KubeletVersion != "v1.34.2" {
		t.Errorf("node1 reports kubelet %q and runtime %q", n.Status.NodeInfo.KubeletVersion, n.Status.NodeInfo.ContainerRuntimeVersion)
	}
}
