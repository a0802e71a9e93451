package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// TestShortConnectionClient is not a test of its own: TestLabShortConnections
// runs this test binary inside a pod with arguments after "--" (target,
// count, concurrency) to open short connections from there, as an
// application would, so capture applies. Without arguments it skips.
func TestShortConnectionClient(t *testing.T) {
	args := flag.Args()
	if len(args) != 3 {
		t.Skip("helper for TestLabShortConnections; runs only inside a lab pod")
	}
	target := args[0]
	n, err1 := strconv.Atoi(args[1])
	workers, err2 := strconv.Atoi(args[2])
	if err1 != nil || err2 != nil || n < 1 || workers < 1 {
		t.Fatalf("usage: -- host:port count concurrency (got %q)", args)
	}
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				if err := shortRequest(target); err != nil {
					errc <- fmt.Errorf("request %d: %w", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	fmt.Printf("%d short connections to %s done\n", n, target)
}

// shortRequest is one connection carrying one HTTP request, closed by the
// server after its answer (like a tcp-crr benchmark's connection per
// request).
func shortRequest(target string) error {
	c, err := net.DialTimeout("tcp", target, 20*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, "GET /hello HTTP/1.1\r\nHost: "+target+"\r\nConnection: close\r\n\r\n"); err != nil {
		return fmt.Errorf("writing the request: %w", err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("reading the answer: %w", err)
	}
	if !strings.HasPrefix(string(b), "HTTP/1.1 200") {
		return fmt.Errorf("unexpected answer %q", truncateTo(string(b), 200))
	}
	return nil
}

func truncateTo(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// agentUsage is what an agent holds at one moment.
type agentUsage struct {
	Goroutines, FDs, Threads int
	CPU                      time.Duration // user+system so far
	Connections              int           // /connections entries
	PoolConns, PoolStreams   int
	PoolOpened               uint64 // streams opened so far (hits + misses)
	profile                  string // goroutine profile, debug=1 (grouped by stack, largest first)
}

func (u agentUsage) String() string {
	return fmt.Sprintf("goroutines=%d fds=%d threads=%d conns=%d pool_conns=%d pool_streams=%d pool_opened=%d cpu=%s",
		u.Goroutines, u.FDs, u.Threads, u.Connections, u.PoolConns, u.PoolStreams, u.PoolOpened, u.CPU)
}

func readUsage(ctx context.Context, m *mesh.Mesh, node string) (agentUsage, error) {
	var u agentUsage
	b, err := m.Get(ctx, node, "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return u, err
	}
	u.profile = string(b)
	first, _, _ := strings.Cut(u.profile, "\n")
	if _, err := fmt.Sscanf(first, "goroutine profile: total %d", &u.Goroutines); err != nil {
		return u, fmt.Errorf("parsing %q: %w", first, err)
	}
	pid := m.Agents[node].Pid
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, err
	}
	u.FDs = len(fds)
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for line := range strings.Lines(string(st)) {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			u.Threads, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, err
	}
	i := strings.LastIndexByte(string(stat), ')')
	f := strings.Fields(string(stat)[i+2:])
	// Fields after the command: state is f[0]; utime, stime are fields 14
	// and 15 of the line, f[11] and f[12] here, in clock ticks (100 Hz).
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	stt, _ := strconv.ParseInt(f[12], 10, 64)
	u.CPU = time.Duration(ut+stt) * 10 * time.Millisecond
	b, err = m.Get(ctx, node, "/connections")
	if err != nil {
		return u, err
	}
	var conns []json.RawMessage
	if err := json.Unmarshal(b, &conns); err != nil {
		return u, fmt.Errorf("decoding /connections: %w", err)
	}
	u.Connections = len(conns)
	b, err = m.Get(ctx, node, "/config_dump/pools")
	if err != nil {
		return u, err
	}
	var pools struct {
		Total struct {
			Conns, Streams int
			Hits, Misses   uint64
		} `json:"total"`
	}
	if err := json.Unmarshal(b, &pools); err != nil {
		return u, fmt.Errorf("decoding /config_dump/pools: %w", err)
	}
	u.PoolConns, u.PoolStreams, u.PoolOpened = pools.Total.Conns, pools.Total.Streams, pools.Total.Hits+pools.Total.Misses
	return u, nil
}

// TestLabShortConnections runs thousands of short connections (one HTTP
// request each, closed by the server) from an enrolled pod on node-1 to
// one on node-2 through the real agents (outbound capture, HBONE, inbound
// delivery), then checks that neither agent keeps anything per connection:
// goroutines, file descriptors and threads return to where they were,
// /connections is empty and the pools have no open stream. It also logs
// the agents' CPU per 1000 connections for a batch before and after the
// burst, which must not grow much.
func TestLabShortConnections(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	for _, ns := range []string{"shop", "client"} {
		setMode(t, ctx, l, ns, state.ModeEnabled)
	}
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Stop(context.Background()); err != nil {
			t.Errorf("stopping the mesh: %v", err)
		}
	})
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	target := net.JoinHostPort(mustLabPod(t, l, "shop/web-2").IP, "8080")
	burst := func(n, workers int) time.Duration {
		t.Helper()
		start := time.Now()
		out, err := l.Exec(ctx, "client/client-1", []string{exe, "-test.run=^TestShortConnectionClient$", "-test.count=1", "--",
			target, strconv.Itoa(n), strconv.Itoa(workers)})
		if err != nil {
			t.Fatalf("short connections from client/client-1: %v\n%s", err, out)
		}
		return time.Since(start)
	}
	nodes := []string{"node-1", "node-2"}
	usage := func() map[string]agentUsage {
		t.Helper()
		out := map[string]agentUsage{}
		for _, n := range nodes {
			u, err := readUsage(ctx, m, n)
			if err != nil {
				t.Fatal(err)
			}
			out[n] = u
		}
		return out
	}
	settled := func(base map[string]agentUsage) func() error {
		return func() error {
			for n, u := range usage() {
				b := base[n]
				if u.Connections != 0 || u.PoolStreams != 0 || u.Goroutines > b.Goroutines+10 || u.FDs > b.FDs+10 {
					return fmt.Errorf("agent on %s still holds %s (before: %s); goroutines:\n%s", n, u, b, truncateTo(u.profile, 4000))
				}
			}
			return nil
		}
	}
	cpu := func(a, b map[string]agentUsage) time.Duration {
		var d time.Duration
		for _, n := range nodes {
			d += b[n].CPU - a[n].CPU
		}
		return d
	}

	// Wait until node-1 tunnels to web-2 (its agent must be known to be
	// mesh-capable first; until then the connections are passthrough).
	waitfor.NoError(t, 2*time.Minute, "connections from client-1 to web-2 to go over HBONE", func() error {
		before := usage()["node-1"].PoolOpened
		burst(10, 1)
		if got := usage()["node-1"].PoolOpened - before; got < 10 {
			return fmt.Errorf("node-1's pool opened %d streams for 10 connections", got)
		}
		return nil
	})
	// Warm up (tunnels, SVIDs, buffers), then let everything settle.
	const batch = 1000
	burst(200, 4)
	waitfor.NoError(t, time.Minute, "warm-up connections to end", func() error {
		for n, u := range usage() {
			if u.Connections != 0 || u.PoolStreams != 0 {
				return fmt.Errorf("agent on %s: %s", n, u)
			}
		}
		return nil
	})
	time.Sleep(2 * time.Second)
	base := usage()
	burst(batch, 4)
	afterBatch1 := usage()
	waitfor.NoError(t, time.Minute, "first batch to settle", settled(base))
	// The burst, many short connections in parallel, as tcp-crr does.
	const n = 4000
	d := burst(n, 32)
	peak := usage()
	if opened := peak["node-1"].PoolOpened - afterBatch1["node-1"].PoolOpened; opened < n {
		t.Fatalf("node-1 tunnelled %d of the %d connections of the burst", opened, n)
	}
	waitfor.NoError(t, 2*time.Minute, "agents to release per-connection state after the burst", settled(base))
	after := usage()
	burst(batch, 4)
	afterBatch2 := usage()
	waitfor.NoError(t, time.Minute, "second batch to settle", settled(base))
	// Passthrough: with shop out of the mesh, client-1's connections to
	// web-2 leave node-1 in plaintext, dialled from inside the pod.
	setMode(t, ctx, l, "shop", state.ModeDisabled)
	waitfor.NoError(t, 2*time.Minute, "connections from client-1 to web-2 to go in plaintext", func() error {
		before := usage()["node-1"].PoolOpened
		burst(10, 1)
		if got := usage()["node-1"].PoolOpened - before; got != 0 {
			return fmt.Errorf("node-1's pool still opened %d streams for 10 connections", got)
		}
		return nil
	})
	burst(200, 4)
	waitfor.NoError(t, time.Minute, "passthrough warm-up connections to end", settled(base))
	pbase := usage()
	burst(batch, 4)
	waitfor.NoError(t, 2*time.Minute, "agents to release per-connection state after passthrough connections", settled(pbase))
	pafter := usage()
	for _, node := range nodes {
		t.Logf("%s: passthrough: before %s, after %d connections %s", node, pbase[node], batch, pafter[node])
	}
	for _, node := range nodes {
		t.Logf("%s: before %s", node, base[node])
		t.Logf("%s: right after %d connections in %s: %s", node, n, d.Round(time.Millisecond), peak[node])
		t.Logf("%s: settled %s", node, after[node])
	}
	c1, c2 := cpu(base, afterBatch1), cpu(after, afterBatch2)
	t.Logf("agents' CPU for %d connections: %s before the burst, %s after", batch, c1, c2)
	// Generous: CPU accounting is coarse (10 ms ticks) and the machine is
	// shared, so only a large, lasting growth fails.
	if c2 > 3*c1+500*time.Millisecond {
		t.Errorf("agents' CPU per %d connections grew from %s to %s after the burst", batch, c1, c2)
	}
}
