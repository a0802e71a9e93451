package cluster_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab/cluster"
	"github.com/nodemesh/nodemesh/lab/labtest"
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
// kube-proxy) with the controller manager and scheduler as a user does,
// with `nodemeshctl cluster up`; checks with `cluster status` that it is
// Ready with the versions it reports; and takes it down with `cluster
// down`, which sweeps it as after a crash, leaving nothing.
func TestClusterBringUp(t *testing.T) {
	privtest.Root(t)
	sweepStale(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	if _, err := cluster.BinDir(ctx); err != nil {
		t.Fatal(err)
	}
	ctl := labtest.GoBuild(t, "./cmd/nodemeshctl")
	id := newID()
	dir := cluster.DefaultStateDir(id)
	run := func(args ...string) []byte {
		t.Helper()
		args = append([]string{"cluster"}, append(args, "--id", id)...)
		cmd := exec.CommandContext(ctx, ctl, args...)
		// This test owns the cluster: if it is killed, the next run's
		// sweepStale removes it.
		cmd.Env = append(os.Environ(), "NODEMESH_CLUSTER_OWNER="+strconv.Itoa(os.Getpid()))
		var errb bytes.Buffer
		cmd.Stderr = &errb
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("nodemeshctl %s: %v\n%s%s", strings.Join(args, " "), err, out, errb.String())
		}
		return out
	}
	t.Cleanup(func() {
		if t.Failed() {
			keepLogs(t, dir)
		}
		if err := cluster.Sweep(context.Background(), id, dir); err != nil {
			t.Errorf("cluster sweep: %v", err)
		}
		if left, err := cluster.Leftovers(id, dir); err != nil || len(left) > 0 {
			t.Errorf("cluster %s left %v (%v)", id, left, err)
		}
	})
	start := time.Now()
	out := run("up", "--nodes", "1")
	t.Logf("nodemeshctl cluster up --nodes 1 (%s):\n%s", time.Since(start).Round(time.Millisecond), out)
	var st cluster.Status
	if err := json.Unmarshal(run("status", "-o", "json"), &st); err != nil {
		t.Fatalf("cluster status -o json: %v", err)
	}
	c, err := cluster.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(kubectl(t, c, "", "get", "nodes", "-o", "wide"))
	if len(st.Nodes) != 1 {
		t.Fatalf("cluster status lists %d nodes, want 1: %+v", len(st.Nodes), st)
	}
	n := st.Nodes[0]
	t.Logf("%s: Ready %s, kubelet %s, runtime %s, pod CIDR %s, hostname %s", n.Name, n.Ready, n.Kubelet, n.Runtime, n.PodCIDR, n.Hostname)
	if n.Name != "node1" || n.Ready != "True" || !strings.HasPrefix(n.Runtime, "containerd://1.") || n.Kubelet != "v1.34.2" || st.Kubeconfig != c.Kubeconfig() {
		t.Errorf("cluster status: %+v", st)
	}
	t.Logf("%s", run("down"))
	if left, err := cluster.Leftovers(id, dir); err != nil || len(left) > 0 {
		t.Errorf("cluster down left %v (%v)", left, err)
	}
}
