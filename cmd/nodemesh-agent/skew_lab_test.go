package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// previousRelease returns the commit TestLabVersionSkew treats as the
// previous release: NODEMESH_SKEW_BASE, else testdata/previous-release.
func previousRelease(t *testing.T) string {
	t.Helper()
	if ref := os.Getenv("NODEMESH_SKEW_BASE"); ref != "" {
		return ref
	}
	f, err := os.Open("testdata/previous-release")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" && !strings.HasPrefix(line, "#") {
			return line
		}
	}
	t.Fatal("testdata/previous-release names no commit")
	return ""
}

// buildPreviousAgent builds the agent of commit ref from this repository's
// history (git archive, so the repository is not touched), cached by
// commit under the user cache directory.
func buildPreviousAgent(t *testing.T, ref string) string {
	t.Helper()
	commit, err := exec.Command("git", "rev-parse", "--verify", ref+"^{commit}").Output()
	if err != nil {
		t.Fatalf("the previous release %s is not in this clone's history (fetch it, or set NODEMESH_SKEW_BASE): %v", ref, err)
	}
	id := strings.TrimSpace(string(commit))
	cache, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(cache, "nodemesh", "skew", id, "nodemesh-agent")
	if _, err := os.Stat(out); err == nil {
		return out
	}
	src := t.TempDir()
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatal(err)
	}
	// From the top: in a subdirectory git archive takes only that subtree.
	archive := exec.Command("sh", "-c", fmt.Sprintf("git archive %s | tar -x -C %s", id, src))
	archive.Dir = strings.TrimSpace(string(top))
	if b, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("extracting %s: %v\n%s", id, err, b)
	}
	tmp := out + ".tmp"
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-o", tmp, "./cmd/nodemesh-agent")
	build.Dir = src
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the agent of %s: %v\n%s", id, err, b)
	}
	if err := os.Rename(tmp, out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestLabVersionSkew runs the previous release's agent (testdata/
// previous-release) next to the current agent and CA, as during a rolling
// upgrade (issue 14, item 9; docs/install.md): traffic crosses between the
// versions in both directions through HBONE, then the old node is
// upgraded in place (the new agent adopts the old one's pinned capture)
// and traffic works again, now delivered transparently on both sides; then
// it is rolled back in place the same way.
func TestLabVersionSkew(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	ref := previousRelease(t)
	oldAgent := buildPreviousAgent(t, ref)
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	for _, ns := range []string{"shop", "client"} {
		setMode(t, ctx, l, ns, state.ModeEnabled)
	}
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin,
		AgentBinaries: map[string]string{"node-1": oldAgent}, Wait: 3 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	logs := []string{m.Agents["node-1"].Log, m.Agents["node-2"].Log}
	t.Cleanup(func() {
		if err := m.Stop(context.Background()); err != nil {
			t.Errorf("stopping the mesh: %v", err)
		}
		if t.Failed() {
			for _, p := range logs {
				dumpLog(t, p)
			}
		}
	})
	node1, node2 := mustNode(t, l, "node-1"), mustNode(t, l, "node-2")
	client1, client2 := mustLabPod(t, l, "client/client-1"), mustLabPod(t, l, "client/client-2")
	web1, web2 := mustLabPod(t, l, "shop/web-1"), mustLabPod(t, l, "shop/web-2")
	handshakes := func(n lab.Node) float64 { return tunnelMetrics(t, n)["handshake_ok"] }

	crossBothWays := func(t *testing.T, oldOnNode1 bool) {
		t.Helper()
		h1, h2 := handshakes(node1), handshakes(node2)
		// node-1 -> node-2: the source agent is node-1's.
		var r1, r2 workload.Reply
		waitfor.NoError(t, 60*time.Second, "client-1 (node-1) -> web-2 (node-2)", func() error {
			var err error
			r1, _, err = demo.Get(ctx, l, client1.Key(), "http://"+web2.IP+":8080/skew")
			return err
		})
		if err := deliveredFrom(r1, web2, client1.IP); err != nil {
			t.Error(err)
		}
		// node-2 -> node-1: node-1's agent is the destination.
		waitfor.NoError(t, 60*time.Second, "client-2 (node-2) -> web-1 (node-1)", func() error {
			var err error
			r2, _, err = demo.Get(ctx, l, client2.Key(), "http://"+web1.IP+":8080/skew")
			return err
		})
		if oldOnNode1 {
			// The previous release delivers from the pod's own address.
			if r2.Pod != web1.Key() || (hostOf(r2.Remote) != web1.IP && deliveredFrom(r2, web1, client2.IP) != nil) {
				t.Errorf("reply %+v: want %s, delivered by node-1's agent", r2, web1.Key())
			}
		} else if err := deliveredFrom(r2, web1, client2.IP); err != nil {
			t.Error(err)
		}
		// Both went through tunnels: each agent completed an inbound
		// mTLS handshake with the other version.
		if a, b := handshakes(node1), handshakes(node2); a <= h1 || b <= h2 {
			t.Errorf("inbound tunnel handshakes: node-1 %v -> %v, node-2 %v -> %v; want both to grow", h1, a, h2, b)
		}
		t.Logf("node-1 -> node-2: %s saw %s; node-2 -> node-1: %s saw %s", r1.Pod, r1.Remote, r2.Pod, r2.Remote)
	}

	t.Run("PreviousAgentWithCurrentAgentAndCA", func(t *testing.T) { crossBothWays(t, true) })

	// replace stops node-1's agent (SIGTERM, as a DaemonSet rollout does)
	// and starts bin there, which adopts the pinned capture it leaves.
	replace := func(t *testing.T, bin string) {
		t.Helper()
		if err := l.StopNodeProcess(ctx, "node-1", "nodemesh-agent", 30*time.Second); err != nil {
			t.Fatal(err)
		}
		m.SetAgentBinary("node-1", bin)
		a, err := m.StartNodeAgent(ctx, "node-1")
		if err != nil {
			t.Fatal(err)
		}
		logs = append(logs, a.Log)
		waitfor.NoError(t, 90*time.Second, "the replaced agent on node-1 ready", func() error {
			code, body, err := httpGet(nodeClient(node1), "http://127.0.0.1:15021/healthz/ready")
			if err != nil {
				return err
			}
			if code != 200 {
				return fmt.Errorf("%d: %s", code, body)
			}
			return nil
		})
	}
	t.Run("UpgradeInPlace", func(t *testing.T) {
		replace(t, "")
		crossBothWays(t, false)
	})
	t.Run("RollBack", func(t *testing.T) {
		// The previous release adopts the pins the current one left.
		replace(t, oldAgent)
		crossBothWays(t, true)
	})
}
