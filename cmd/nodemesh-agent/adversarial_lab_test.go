package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// TestAdversaryHelper is not a test of its own: TestLabAdversarial runs
// this test binary inside a lab pod, with arguments after "--", to attack
// from where any pod attacks. Modes:
//
//	hold ADDR N KIND   open N connections to ADDR and hold them until
//	                   stdin closes; KIND slowbody sends the headers of a
//	                   CA sign request announcing 64 KiB and one byte of
//	                   it over TLS, KIND idle sends nothing, KIND trickle
//	                   sends a TLS record one byte every 500 ms. Prints
//	                   "ready <established>" once all are open.
//	probe ADDR KIND    one connection; prints what came back (KIND http:
//	                   GET /metrics; plain: a line of text; h2c: the HTTP/2
//	                   preface).
func TestAdversaryHelper(t *testing.T) {
	args := flag.Args()
	if len(args) < 3 {
		t.Skip("helper for TestLabAdversarial; runs only inside a lab pod")
	}
	switch args[0] {
	case "hold":
		n, err := strconv.Atoi(args[2])
		if err != nil || len(args) != 4 {
			t.Fatalf("usage: hold ADDR N KIND (got %q)", args)
		}
		holdConns(args[1], n, args[3])
	case "probe":
		fmt.Println(probe(args[1], args[2]))
	default:
		t.Fatalf("unknown mode %q", args[0])
	}
}

func holdConns(addr string, n int, kind string) {
	var conns []net.Conn
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for range n {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				return
			}
			if kind == "slowbody" {
				tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
				tc.SetDeadline(time.Now().Add(10 * time.Second))
				if err := tc.Handshake(); err != nil {
					c.Close()
					return
				}
				if _, err := fmt.Fprintf(tc, "POST %s HTTP/1.1\r\nHost: ca\r\nAuthorization: Bearer x.y.z\r\nContent-Length: %d\r\n\r\n{", identity.SignPath, identity.MaxRequestBytes); err != nil {
					c.Close()
					return
				}
				tc.SetDeadline(time.Time{})
				c = tc
			}
			if kind == "trickle" {
				// A TLS handshake record header, then one byte every
				// 500 ms: never a complete ClientHello.
				go func() {
					hello := append([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}, make([]byte, 512)...)
					for _, b := range hello {
						if _, err := c.Write([]byte{b}); err != nil {
							return
						}
						time.Sleep(500 * time.Millisecond)
					}
				}()
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	fmt.Printf("ready %d\n", len(conns))
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		c.Close()
	}
}

// probe makes one connection and reports what the other side did.
func probe(addr, kind string) string {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "dial: " + errClass(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var req string
	switch kind {
	case "http":
		req = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
	case "h2c":
		req = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
	default:
		req = "hello in plaintext\r\n"
	}
	if _, err := io.WriteString(c, req); err != nil {
		return "write: " + errClass(err)
	}
	b, err := io.ReadAll(io.LimitReader(c, 512))
	if len(b) > 0 {
		line, _, _ := strings.Cut(string(b), "\r\n")
		return "data: " + line
	}
	if err != nil {
		return "read: " + errClass(err)
	}
	return "closed"
}

func errClass(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
		return "timeout"
	case strings.Contains(err.Error(), "connection refused"):
		return "refused"
	case strings.Contains(err.Error(), "connection reset"):
		return "reset"
	}
	return err.Error()
}

// usageWithRSS is an agent's usage plus its memory: resident, and its
// live Go heap right after a forced garbage collection.
type usageWithRSS struct {
	agentUsage
	RSS       int64  // bytes
	HeapLive  uint64 // runtime.MemStats.HeapAlloc after runtime.GC: bytes of reachable objects
	HeapInuse uint64 // runtime.MemStats.HeapInuse at the same moment (includes partly used spans)
}

func (u usageWithRSS) String() string {
	return fmt.Sprintf("%s rss=%.1fMiB heap_live=%.1fMiB heap_inuse=%.1fMiB", u.agentUsage,
		float64(u.RSS)/(1<<20), float64(u.HeapLive)/(1<<20), float64(u.HeapInuse)/(1<<20))
}

func readUsageRSS(ctx context.Context, m *mesh.Mesh, node string) (usageWithRSS, error) {
	u, err := readUsage(ctx, m, node)
	if err != nil {
		return usageWithRSS{}, err
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", m.Agents[node].Pid))
	if err != nil {
		return usageWithRSS{}, err
	}
	out := usageWithRSS{agentUsage: u}
	for line := range strings.Lines(string(st)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			out.RSS = kb << 10
		}
	}
	if out.HeapLive, out.HeapInuse, err = heapAfterGC(ctx, m, node); err != nil {
		return usageWithRSS{}, err
	}
	return out, nil
}

// heapAfterGC reads an agent's Go heap through its admin port (node
// loopback): /debug/pprof/heap?gc=1 runs runtime.GC() (a full, blocking
// collection, sweep included) before it reads runtime.MemStats, and
// debug=1 prints them. HeapAlloc is then the bytes of reachable objects:
// what the agent holds, independent of when the collector last ran or of
// how much memory the runtime keeps mapped (RSS), so it does not depend on
// the machine's speed.
func heapAfterGC(ctx context.Context, m *mesh.Mesh, node string) (live, inuse uint64, err error) {
	b, err := m.Get(ctx, node, "/debug/pprof/heap?gc=1&debug=1")
	if err != nil {
		return 0, 0, fmt.Errorf("reading the heap of %s's agent: %w", node, err)
	}
	var haveLive, haveInuse bool
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "# HeapAlloc = "); ok {
			live, err = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			haveLive = err == nil
		}
		if v, ok := strings.CutPrefix(line, "# HeapInuse = "); ok {
			inuse, err = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			haveInuse = err == nil
		}
	}
	if !haveLive || !haveInuse {
		return 0, 0, fmt.Errorf("no HeapAlloc/HeapInuse in %s's heap profile (%d bytes)", node, len(b))
	}
	return live, inuse, nil
}

// heapMargin is how far an agent's live heap (after a forced GC) may stay
// above its baseline once an attack is over. What an attack may leave
// behind legitimately is small: the runtime never frees goroutine
// descriptors (about 400 bytes each, so ~1 MiB after the 2,300 goroutines
// of the plaintext flood), Go maps keep the buckets they grew to (a few
// connection tables of 1,200 entries, well under 1 MiB), and lazily built
// state on first use of a code path (KiBs). What the issue is about is far
// larger: a 1 MiB header block pinned per CONNECT, 16 MiB of flow-control
// buffer per connection, or any per-connection state kept after the
// connection is gone (8 KiB for each of the flood's 1,200 connections is
// over the margin). 8 MiB sits between the two with room on both sides.
// Measured (2026-12-02): baselines of 2.8 MiB; the plaintext flood leaves
// node-2 at 6.0 MiB, which stays there through the later attacks (a
// high-water mark, not growth per attack); no other attack moves it.
// sync.Pool contents survive one GC (its victim cache) and go with the
// next, so settled polls, each poll a new GC, and passes on the first
// sample under the bound: a slow machine only takes more polls.
const heapMargin = 8 << 20

// backTo reports whether u is back at the baseline b: no connection
// left, goroutines and file descriptors within 10 of it (a few belong to
// pooled tunnels and informers that come and go), and the live heap
// within heapMargin.
func (u usageWithRSS) backTo(b usageWithRSS) error {
	if u.Connections != 0 || u.Goroutines > b.Goroutines+10 || u.FDs > b.FDs+10 || u.HeapLive > b.HeapLive+heapMargin {
		return fmt.Errorf("holds %s (before: %s; live heap may exceed it by %d MiB)", u, b, heapMargin>>20)
	}
	return nil
}

// TestLabAdversarial attacks real agents and the real CA in the lab from
// a pod outside the mesh (namespace client), as any pod of a cluster can,
// and checks the bound each attack hits (issue 14). For each attack it
// measures the agents' goroutines, file descriptors and memory before,
// during and after, and requires them to come back to the baseline (the
// live heap after a forced GC within heapMargin); and it captures the
// underlay while the attack runs, with mesh requests between web-1 and
// web-2 before, during (where the attack allows) and after it, and
// requires that none of their payload crossed it in plaintext.
func TestLabAdversarial(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	setMode(t, ctx, l, "shop", state.ModeEnabled) // client stays outside: the attacker
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
	helper := func(args ...string) []string {
		return append([]string{exe, "-test.run=^TestAdversaryHelper$", "-test.count=1", "--"}, args...)
	}
	nodes := []string{"node-1", "node-2"}
	usage := func() map[string]usageWithRSS {
		t.Helper()
		out := map[string]usageWithRSS{}
		for _, n := range nodes {
			u, err := readUsageRSS(ctx, m, n)
			if err != nil {
				t.Fatal(err)
			}
			out[n] = u
		}
		return out
	}
	settled := func(base map[string]usageWithRSS) func() error {
		return func() error {
			for n, u := range usage() {
				if err := u.backTo(base[n]); err != nil {
					return fmt.Errorf("agent on %s %w", n, err)
				}
			}
			return nil
		}
	}
	// hold runs a "hold" attack from pod and returns once every connection
	// is open, with a function that ends the attack.
	hold := func(pod, addr string, n int, kind string) (established int, stop func()) {
		t.Helper()
		pr, pw := io.Pipe()
		out, outW := io.Pipe()
		done := make(chan error, 1)
		go func() {
			done <- l.ExecStream(ctx, pod, helper("hold", addr, strconv.Itoa(n), kind), pr, outW, os.Stderr)
			outW.Close()
		}()
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil {
			pw.Close()
			t.Fatalf("attack from %s: %v (%v)", pod, err, <-done)
		}
		if _, err := fmt.Sscanf(line, "ready %d", &established); err != nil {
			t.Fatalf("attack from %s: %q", pod, line)
		}
		go io.Copy(io.Discard, out)
		return established, func() {
			pw.Close()
			if err := <-done; err != nil {
				t.Errorf("attack from %s: %v", pod, err)
			}
		}
	}
	probeFrom := func(pod, addr, kind string) string {
		t.Helper()
		b, err := l.Exec(ctx, pod, helper("probe", addr, kind))
		if err != nil {
			t.Fatalf("probe %s from %s: %v", addr, pod, err)
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		return lines[0]
	}
	node1, node2 := mustNode(t, l, "node-1"), mustNode(t, l, "node-2")
	web1, web2 := mustLabPod(t, l, "shop/web-1"), mustLabPod(t, l, "shop/web-2")
	caHost := strings.TrimPrefix(m.CAAddr, "https://")
	// Mesh traffic both ways between the nodes, whose payload must never
	// cross the underlay in plaintext. Sent once before the baseline, so
	// that the pooled tunnels it opens are part of it.
	meshRoutes := []route{{from: web1, to: web2}, {from: web2, to: web1}}
	plaintextSeen(t, ctx, l, node1.Link, mustLabPod(t, l, "client/client-1"), web2)
	waitfor.NoError(t, 30*time.Second, "mesh traffic both ways before the attacks", func() error {
		for _, r := range meshRoutes {
			if _, out, err := demo.Get(ctx, l, r.from.Key(), r.url("warm-up")); err != nil {
				return fmt.Errorf("%s -> %s: %w %s", r.from.Key(), r.to.Key(), err, out)
			}
		}
		return nil
	})
	base := usage()
	for _, n := range nodes {
		t.Logf("%s baseline: %s", n, base[n])
	}
	// attack runs one attack as a subtest between the checks every attack
	// gets: the underlay captured throughout with mesh requests before and
	// after (fn adds some during the attack where it can), then the agents
	// back at their baseline, memory included.
	attack := func(name string, fn func(t *testing.T, w *underlayWatch)) {
		t.Run(name, func(t *testing.T) {
			w := watchUnderlay(t, ctx, l, node1.Link, meshRoutes...)
			if n := w.meshTraffic(); n != len(meshRoutes) {
				t.Errorf("mesh traffic before the attack: %d of %d requests answered", n, len(meshRoutes))
			}
			fn(t, w)
			// An attack that restarts an agent leaves it a few seconds to
			// fetch SVIDs and enroll pods again.
			waitfor.NoError(t, time.Minute, "mesh traffic both ways after the attack", func() error {
				if n := w.meshTraffic(); n != len(meshRoutes) {
					return fmt.Errorf("%d of %d requests answered", n, len(meshRoutes))
				}
				return nil
			})
			waitfor.NoError(t, 2*time.Minute, "agents back at their baseline after the attack", settled(base))
			w.check()
			for n, u := range usage() {
				t.Logf("%s after the attack: %s", n, u)
			}
		})
	}

	attack("CASlowBody", func(t *testing.T, w *underlayWatch) {
		// More slow bodies than the CA's 64 in-flight slots, from one pod:
		// before the fix they stopped every SVID issuance for 30 s.
		got, stop := hold("client/client-1", caHost, 100, "slowbody")
		defer stop()
		t.Logf("slow-body connections held open to the CA: %d", got)
		for i := range 3 {
			if code, body := agentSign(t, ctx, l, node2, caHost); code != http.StatusOK {
				t.Fatalf("agent sign request %d during the attack: %d %s", i, code, body)
			}
		}
		if n := w.meshTraffic(); n != len(meshRoutes) {
			t.Errorf("mesh traffic during the attack: %d of %d requests answered", n, len(meshRoutes))
		}
	})

	attack("AgentPortsFromAPod", func(t *testing.T, w *underlayWatch) {
		for _, tc := range []struct{ addr, kind, want string }{
			{net.JoinHostPort(node2.IP, "15020"), "http", "data: HTTP/1.1 403"},
			{net.JoinHostPort(node2.IP, "15021"), "http", "data: HTTP/1.1 403"},
			{net.JoinHostPort(node2.IP, "15000"), "http", "dial: refused"},
			{net.JoinHostPort(node1.IP, "15020"), "http", "data: HTTP/1.1 403"},
			{"127.0.0.1:15020", "http", "dial: refused"},
			{"127.0.0.1:15000", "http", "dial: refused"},
			// Agent ports on an enrolled pod's IP are steered to the agent,
			// which refuses them (never its own listener, never the app).
			{net.JoinHostPort(web2.IP, "15006"), "plain", "read: reset"},
			{net.JoinHostPort(web2.IP, "15001"), "plain", "read: reset"},
			{net.JoinHostPort(web2.IP, "15020"), "plain", "read: reset"},
			// 15008 speaks only TLS: plaintext and h2c prior knowledge get
			// no HTTP answer.
			{net.JoinHostPort(web2.IP, "15008"), "plain", ""},
			{net.JoinHostPort(web2.IP, "15008"), "h2c", ""},
		} {
			got := probeFrom("client/client-2", tc.addr, tc.kind)
			// A reset may reach the client while it still completes the
			// connect, at its write or at its first read, depending on
			// timing: all are the refusal this checks.
			if tc.want == "read: reset" && (got == "dial: reset" || got == "write: reset") {
				got = "read: reset"
			}
			switch {
			case tc.want != "" && !strings.HasPrefix(got, tc.want):
				t.Errorf("%s (%s) from a pod: %q, want %q", tc.addr, tc.kind, got, tc.want)
			case tc.want == "" && (strings.Contains(got, "HTTP/") || strings.Contains(got, "hello")):
				t.Errorf("%s (%s) from a pod answered in plaintext: %q", tc.addr, tc.kind, got)
			default:
				t.Logf("%s (%s) from a pod: %s", tc.addr, tc.kind, got)
			}
		}
	})

	attack("InboundPlaintextFlood", func(t *testing.T, w *underlayWatch) {
		// Held-open plaintext connections to an enrolled pod (PERMISSIVE):
		// at most 1024 reach the app through the agent; the rest are reset.
		target := net.JoinHostPort(web2.IP, "8080")
		got, stop := hold("client/client-2", target, 1200, "idle")
		during := usage()
		// Mesh traffic to the flooded pod still goes through the tunnel
		// (after the measurement above, whose connection count it would
		// change).
		if n := w.meshTraffic(); n != len(meshRoutes) {
			t.Errorf("mesh traffic during the flood: %d of %d requests answered", n, len(meshRoutes))
		}
		stop()
		t.Logf("plaintext connections opened to %s: %d; node-2 during: %s", target, got, during["node-2"])
		if c := during["node-2"].Connections; c > 1024 {
			t.Errorf("node-2 holds %d plaintext connections to one pod, more than its limit of 1024", c)
		}
		waitfor.NoError(t, 2*time.Minute, "agents to release the flood's connections", settled(base))
		after := usage()
		t.Logf("node-2 after: %s (before %s)", after["node-2"], base["node-2"])
	})

	// The tunnel port from a pod outside the mesh (client-2), with forged
	// and with real credentials (issue 14: a foreign trust domain and a
	// wrong SPIFFE ID, CONNECT to an address other than the pod, HTTP/2
	// floods, oversized headers).
	client2 := mustLabPod(t, l, "client/client-2")
	tunnel := net.JoinHostPort(web2.IP, "15008")
	app2 := net.JoinHostPort(web2.IP, "8080")
	realSVID := svidFor(t, ctx, l, node2, caHost, "spiffe://cluster.local/ns/shop/sa/web")
	// Attacks that need a valid identity come from web-1 (shop/web, on
	// node-1), whose SVID the attacker holds: a compromised pod or node.
	// The test dials from web-1's namespace outside its cgroup, so capture
	// does not take the connection.

	attack("TunnelForgedIdentities", func(t *testing.T, w *underlayWatch) {
		before := tunnelMetrics(t, node2)
		foreignTD := forgedCert(t, "spiffe://evil.example/ns/shop/sa/web")
		wrongRoot := forgedCert(t, "spiffe://cluster.local/ns/client/sa/client")
		for _, tc := range []struct {
			name string
			cert *tls.Certificate
			ok   bool
		}{
			{"no client certificate", nil, false},
			{"a foreign trust domain", &foreignTD, false},
			{"a mesh SPIFFE ID signed by another root", &wrongRoot, false},
			{"an SVID of the mesh's CA (control: the attack path works)", &realSVID, true},
		} {
			h, err := dialTunnel(ctx, client2.Netns, tunnel, tc.cert)
			if h != nil {
				h.Close()
			}
			switch {
			case (err == nil) != tc.ok:
				t.Errorf("%s: err %v, want accepted=%v", tc.name, err, tc.ok)
			default:
				t.Logf("%s: %v", tc.name, err)
			}
		}
		after := tunnelMetrics(t, node2)
		refused := 0.0
		for k, v := range after {
			if strings.HasPrefix(k, "handshake_") && k != "handshake_ok" {
				refused += v - before[k]
			}
		}
		if refused < 3 {
			t.Errorf("node-2 counted %v refused handshakes, want the 3 forged ones (before %v, after %v)", refused, before, after)
		}
	})

	attack("ConnectElsewhere", func(t *testing.T, w *underlayWatch) {
		// A peer with a valid SVID asks web-2's tunnel for anything but
		// web-2's own application ports: refused per stream, never dialled.
		before := tunnelMetrics(t, node2)
		// The SVID from another pod's address: the destination's policy
		// requires the certificate to match the source pod.
		stolen, err := dialTunnel(ctx, client2.Netns, tunnel, &realSVID)
		if err != nil {
			t.Fatal(err)
		}
		if got := stolen.connect(1, app2); got != "401" {
			t.Errorf("CONNECT %s with shop/web's SVID from client-2's address: %s, want 401", app2, got)
		}
		stolen.Close()
		h, err := dialTunnel(ctx, web1.Netns, tunnel, &realSVID)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		id := uint32(1)
		refusals := 0
		for _, tc := range []struct{ target, want string }{
			{app2, "200"}, // control: the pod's own application
			{net.JoinHostPort(web1.IP, "8080"), "400"},
			{net.JoinHostPort(node2.IP, "8080"), "400"},
			{net.JoinHostPort(client2.IP, "8080"), "400"},
			{"127.0.0.1:8080", "400"},
			{"[::1]:8080", "400"},
			{"web.shop.svc.cluster.local:8080", "400"},
			{net.JoinHostPort(web2.IP, "15000"), "400"},
			{net.JoinHostPort(web2.IP, "15006"), "400"},
			{net.JoinHostPort(web2.IP, "15020"), "400"},
		} {
			got := h.connect(id, tc.target)
			if got == "200" {
				h.fr.WriteRSTStream(id, http2.ErrCodeCancel)
			}
			switch {
			case got != tc.want:
				t.Errorf("CONNECT %s: %s, want %s", tc.target, got, tc.want)
			case tc.want != "200":
				refusals++
				fallthrough
			default:
				t.Logf("CONNECT %s: %s", tc.target, got)
			}
			id += 2
		}
		waitfor.NoError(t, 10*time.Second, "node-2 to count the refusals", func() error {
			after := tunnelMetrics(t, node2)
			if d := after["denied_error"] - before["denied_error"]; d < float64(refusals-1) { // a host name may be refused before a flow exists
				return fmt.Errorf("inbound refusals counted: %v, want about %d", d, refusals)
			}
			return nil
		})
	})

	attack("StalledTunnelHandshakes", func(t *testing.T, w *underlayWatch) {
		// Connections to 15008 that never send a ClientHello: at most 64
		// per peer address are kept (128 handshakes per listener), and
		// each is closed after the 10 s handshake timeout although the
		// attacker keeps its end open.
		before := tunnelMetrics(t, node2)
		got, stop := hold("client/client-2", tunnel, 300, "idle")
		defer stop()
		during := usage()["node-2"]
		t.Logf("stalled connections opened to %s: %d; node-2 during: %s", tunnel, got, during)
		if extra := during.FDs - base["node-2"].FDs; extra > 64+20 {
			t.Errorf("node-2 holds %d more file descriptors during the attack, want at most the per-peer limit of 64 (+20)", extra)
		}
		// Another peer's tunnels are not held up by the stalled ones.
		if n := w.meshTraffic(); n != len(meshRoutes) {
			t.Errorf("mesh traffic during the attack: %d of %d requests answered", n, len(meshRoutes))
		}
		waitfor.NoError(t, 40*time.Second, "the handshake timeout to free node-2 while the attacker still holds its connections", func() error {
			m := tunnelMetrics(t, node2)
			if m["peer_connections"] <= before["peer_connections"] || m["timeout"] <= before["timeout"] {
				return fmt.Errorf("limit counters peer_connections %v -> %v, timeout %v -> %v", before["peer_connections"], m["peer_connections"], before["timeout"], m["timeout"])
			}
			return settled(base)()
		})
		t.Logf("node-2 after the timeouts (attack still open): %s", usage()["node-2"])
	})

	attack("TrickledTunnelHandshakes", func(t *testing.T, w *underlayWatch) {
		// A ClientHello trickled one byte every 500 ms from 50
		// connections: the 10 s handshake deadline holds for slow
		// handshakes as for stalled ones.
		before := tunnelMetrics(t, node2)
		got, stop := hold("client/client-1", tunnel, 50, "trickle")
		defer stop()
		t.Logf("trickling connections opened to %s: %d; node-2 during: %s", tunnel, got, usage()["node-2"])
		if n := w.meshTraffic(); n != len(meshRoutes) {
			t.Errorf("mesh traffic during the attack: %d of %d requests answered", n, len(meshRoutes))
		}
		waitfor.NoError(t, 40*time.Second, "the handshake timeout to close the trickling connections", func() error {
			m := tunnelMetrics(t, node2)
			if d := m["timeout"] - before["timeout"]; d < float64(got) {
				return fmt.Errorf("handshake timeouts +%v, want one per connection (%d)", d, got)
			}
			return settled(base)()
		})
		t.Logf("node-2 after the timeouts (attacker still trickling): %s", usage()["node-2"])
	})

	attack("UDPAndSCTPOnlyAllowOpensNoTCP", func(t *testing.T, w *underlayWatch) {
		// A NetworkPolicy that admits web only on UDP and SCTP 8080 must
		// not let TCP 8080 in: neither plaintext (client-2) nor through
		// the tunnel (a shop/web identity from web-1).
		if got := probeFrom("client/client-2", app2, "http"); !strings.HasPrefix(got, "data: HTTP/1.1 200") {
			t.Fatalf("before the policy: %s (want 200: the control)", got)
		}
		udp, sctp := corev1.ProtocolUDP, corev1.ProtocolSCTP
		port := intstr.FromInt32(8080)
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "web-udp-sctp-only", Namespace: "shop"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{
					{Protocol: &udp, Port: &port}, {Protocol: &sctp, Port: &port}}}},
			}}
		nps := l.Server.Client.NetworkingV1().NetworkPolicies("shop")
		if _, err := nps.Create(ctx, np, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		defer nps.Delete(context.Background(), np.Name, metav1.DeleteOptions{})
		waitfor.NoError(t, 30*time.Second, "plaintext TCP refused under a UDP/SCTP-only allow", func() error {
			if got := probeFrom("client/client-2", app2, "http"); strings.HasPrefix(got, "data:") {
				return fmt.Errorf("TCP 8080 from client-2 answered: %s", got)
			}
			return nil
		})
		h, err := dialTunnel(ctx, web1.Netns, tunnel, &realSVID)
		if err != nil {
			t.Fatal(err)
		}
		if got := h.connect(1, app2); got != "401" {
			t.Errorf("CONNECT %s under a UDP/SCTP-only allow: %s, want 401", app2, got)
		}
		h.Close()
		if err := nps.Delete(ctx, np.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitfor.NoError(t, 30*time.Second, "TCP allowed again without the policy", func() error {
			if got := probeFrom("client/client-2", app2, "http"); !strings.HasPrefix(got, "data: HTTP/1.1 200") {
				return fmt.Errorf("%s", got)
			}
			return nil
		})
	})

	attack("HTTP2Floods", func(t *testing.T, w *underlayWatch) {
		pad := func(h *h2conn) []byte {
			h.buf.Reset()
			h.enc.WriteField(hpack.HeaderField{Name: "x-pad", Value: strings.Repeat("a", 200)})
			return bytes.Clone(h.buf.Bytes())
		}
		for _, tc := range []struct {
			name   string
			limits []string // the limit counter(s) that must move
			send   func(h *h2conn) error
		}{
			{"PING", []string{"flood"}, func(h *h2conn) error {
				for i := range 5000 {
					if err := h.fr.WritePing(false, [8]byte{byte(i), byte(i >> 8)}); err != nil {
						return err
					}
				}
				return nil
			}},
			{"SETTINGS", []string{"flood"}, func(h *h2conn) error {
				for range 5000 {
					if err := h.fr.WriteSettings(); err != nil {
						return err
					}
				}
				return nil
			}},
			{"empty DATA", []string{"flood"}, func(h *h2conn) error {
				for range 5000 {
					if err := h.fr.WriteData(1, false, nil); err != nil {
						return err
					}
				}
				return nil
			}},
			{"rapid reset", []string{"flood", "streams"}, func(h *h2conn) error {
				blk := h.block(app2)
				for i := range 5000 {
					id := uint32(2*i + 1)
					if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: blk, EndHeaders: true}); err != nil {
						return err
					}
					if err := h.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
						return err
					}
				}
				return nil
			}},
			{"CONTINUATION", []string{"header_size"}, func(h *h2conn) error {
				if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: h.block(app2)}); err != nil {
					return err
				}
				p := pad(h)
				for range 5000 {
					if err := h.fr.WriteContinuation(1, false, p); err != nil {
						return err
					}
				}
				return nil
			}},
			{"oversized header", []string{"header_size"}, func(h *h2conn) error {
				blk := h.block(app2, hpack.HeaderField{Name: "x-big", Value: strings.Repeat("b", 1<<20)})
				first, rest := blk[:16<<10], blk[16<<10:]
				if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: first}); err != nil {
					return err
				}
				for len(rest) > 0 {
					n := min(len(rest), 16<<10)
					if err := h.fr.WriteContinuation(1, n == len(rest), rest[:n]); err != nil {
						return err
					}
					rest = rest[n:]
				}
				return nil
			}},
		} {
			before := tunnelMetrics(t, node2)
			h, err := dialTunnel(ctx, web1.Netns, tunnel, &realSVID)
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if tc.name == "empty DATA" {
				if st := h.connect(1, app2); st != "200" {
					t.Fatalf("%s: CONNECT %s: %s", tc.name, app2, st)
				}
			}
			start := time.Now()
			h.c.SetWriteDeadline(time.Now().Add(20 * time.Second))
			sent := make(chan error, 1)
			go func() { sent <- tc.send(h) }()
			goaway, closed := h.drain(20 * time.Second)
			h.Close()
			serr := <-sent
			during := usage()["node-2"]
			after := tunnelMetrics(t, node2)
			var moved []string
			for _, lim := range tc.limits {
				if after[lim] > before[lim] {
					moved = append(moved, fmt.Sprintf("%s +%v", lim, after[lim]-before[lim]))
				}
			}
			t.Logf("%s flood: GOAWAY %q, closed %v after %v (sender: %v); limits %v; node-2 %s",
				tc.name, goaway, closed, time.Since(start).Round(time.Millisecond), serr, moved, during)
			if !closed || goaway != "ENHANCE_YOUR_CALM" {
				t.Errorf("%s flood: connection closed %v with GOAWAY %q, want closed with ENHANCE_YOUR_CALM", tc.name, closed, goaway)
			}
			if len(moved) == 0 {
				t.Errorf("%s flood: none of the limit counters %v moved (before %v, after %v)", tc.name, tc.limits, before, after)
			}
		}
		waitfor.NoError(t, 2*time.Minute, "agents to release the floods' connections", settled(base))
	})

	attack("MaliciousPeerResponses", func(t *testing.T, w *underlayWatch) {
		// The client side of a tunnel: node-1's agent dials a peer that
		// answers with bytes before the 200, or with a 1 MiB header
		// block. The peer is a fake at web-2's address with web-2's real
		// SVID (a compromised node-2): node-2's agent is killed, and the
		// fake takes 15008 in web-2's namespace before node-2's mark
		// expires, so node-1 still tunnels to it. web-1's application
		// must get an error and none of the peer's bytes.
		if err := syscall.Kill(m.Agents["node-2"].Pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// With node-2's agent gone, web-2's connections fail closed: its
		// capture stays pinned and finds no listener (nothing goes out in
		// plaintext, which the capture checks).
		if n := w.meshTraffic(route{from: web2, to: web1}); n != 0 {
			t.Errorf("web-2 reached web-1 while node-2's agent was dead")
		}
		listen := func() *net.TCPListener {
			t.Helper()
			var ln *net.TCPListener
			waitfor.NoError(t, 10*time.Second, "15008 in web-2 free for the fake peer", func() error {
				var err error
				ln, err = inpod.ListenTCP(ctx, web2.Netns, "tcp4", tunnel)
				return err
			})
			return ln
		}
		defer func() {
			if _, err := m.StartNodeAgent(ctx, "node-2"); err != nil {
				t.Fatal(err)
			}
			waitfor.NoError(t, 90*time.Second, "node-2's agent back and delivering", func() error {
				if got := probeFrom("client/client-2", app2, "http"); !strings.HasPrefix(got, "data: HTTP/1.1 200") {
					return fmt.Errorf("%s", got)
				}
				return nil
			})
			base["node-2"] = usage()["node-2"] // a new process: its own baseline
		}()
		for _, mode := range []string{"data-before-200", "huge-headers"} {
			marker := fmt.Sprintf("NODEMESH-PEER-%s-%d", mode, time.Now().UnixNano())
			w.forbid(marker)
			events := make(chan string, 100)
			stopFake := fakeTunnel(listen(), realSVID, mode, marker, events)
			r, out, err := demo.Get(ctx, l, "shop/web-1", "http://"+app2+"/"+mode)
			stopFake()
			var seen []string
			for done := false; !done; {
				select {
				case e := <-events:
					seen = append(seen, e)
				case <-time.After(2 * time.Second):
					done = true
				}
			}
			t.Logf("%s: web-1 got err %v, output %q; the fake peer saw %v", mode, err, firstN(string(out), 200), seen)
			if !slices.ContainsFunc(seen, func(e string) bool { return strings.HasPrefix(e, "connect ") }) {
				t.Fatalf("%s: node-1's agent never sent the fake peer a CONNECT (%v): the attack did not happen", mode, seen)
			}
			if err == nil {
				t.Errorf("%s: web-1's request succeeded: %+v", mode, r)
			}
			if strings.Contains(string(out), marker) {
				t.Errorf("%s: the peer's bytes reached web-1's application: %q", mode, firstN(string(out), 300))
			}
		}
		waitfor.NoError(t, time.Minute, "node-1 back to its baseline", func() error {
			u, err := readUsageRSS(ctx, m, "node-1") // node-2's agent is down: usage() would fail
			if err != nil {
				return err
			}
			if err := u.backTo(base["node-1"]); err != nil {
				return fmt.Errorf("node-1 %w", err)
			}
			return nil
		})
	})

	waitfor.NoError(t, 2*time.Minute, "agents back to their baseline", settled(base))
	after := usage()
	for _, n := range nodes {
		t.Logf("%s: before %s; after every attack %s", n, base[n], after[n])
	}
}

func mustNode(t *testing.T, l *lab.Lab, name string) lab.Node {
	t.Helper()
	n, err := l.Node(name)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// agentSign sends a sign request as node's agent does (its pod-bound
// token, from the node's network namespace) for a workload of that node,
// and returns the HTTP status and body.
func agentSign(t *testing.T, ctx context.Context, l *lab.Lab, node lab.Node, caHost string) (int, string) {
	t.Helper()
	code, body, _ := signAs(t, ctx, l, node, caHost, "spiffe://cluster.local/ns/shop/sa/web")
	return code, body
}

// signAs requests an SVID for id as node's agent and returns the HTTP
// status, the body and the key of the CSR.
func signAs(t *testing.T, ctx context.Context, l *lab.Lab, node lab.Node, caHost, id string) (int, string, *ecdsa.PrivateKey) {
	t.Helper()
	exp := int64(600)
	c := l.Server.Client
	agentPod, err := c.CoreV1().Pods(mesh.SystemNamespace).Get(ctx, "nodemesh-agent-"+node.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := c.CoreV1().ServiceAccounts(mesh.SystemNamespace).CreateToken(ctx, "nodemesh-agent", &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{identity.Audience}, ExpirationSeconds: &exp,
		BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: agentPod.Name, UID: agentPod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(identity.SignRequest{SPIFFEID: id, CSR: csr})
	d := &inpod.Dialer{Netns: node.Netns}
	hc := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // the CA's identity is not under test here
	}}
	defer hc.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+caHost+identity.SignPath, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+tr.Status.Token)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("agent sign request: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return resp.StatusCode, string(b), key
}
