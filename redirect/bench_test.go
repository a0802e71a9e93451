package redirect

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

// Benchmarks compare captured and uncaptured connections in one run,
// interleaved operation by operation so that machine noise hits both
// alike. The benchmark process itself plays the app: it moves into the
// enrolled pod's cgroup, and the benchmark goroutine stays on an OS thread
// inside the pod's namespace for the whole loop (so no setns per dial).
// "captured" connects to the other pod's port 8080; "direct" to its port
// 8081, which is excluded from capture for the pod -- the same path an
// unenrolled pod takes. The agent side is a plain Go proxy (accept on
// 15001, dial the original destination with the bypass mark, copy both
// ways) -- no TLS, so the figures isolate capture itself.

const (
	benchEcho = 7001 // agent-terminated echo (same-node leg only)
	benchSink = 7002 // agent-terminated sink: 1-byte ack per 1 MiB block
)

type benchEnv struct {
	tp   *topo
	c    *Capture
	a, b *testPod // a enrolled (port 8081 excluded), b the server
}

func newBenchEnv(b *testing.B) *benchEnv {
	privtest.Root(b)
	tp := newTopo(b)
	e := &benchEnv{tp: tp, a: tp.pod("a"), b: tp.pod("b")}
	cfg := tp.config()
	cfg.Accel = AccelForce // benchProxy never splices; see docs/capture.md
	c, err := Load(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	e.c = c
	echoServe(b, listenIn(b, e.b, "tcp", ":8080"))
	echoServe(b, listenIn(b, e.b, "tcp", ":8081"))
	ep, err := c.Enroll(context.Background(), Pod{Name: "a", Netns: e.a.netns, Cgroup: e.a.cgroup, IPs: e.a.ips(), ExcludeOutboundPorts: []uint16{8081}})
	if err != nil {
		b.Fatal(err)
	}
	benchProxy(b, c, ep)
	// Become the app: move into the enrolled pod's cgroup (back afterwards).
	pid := []byte(fmt.Sprint(os.Getpid()))
	if err := os.WriteFile(filepath.Join(e.a.cgroup, "cgroup.procs"), pid, 0); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.WriteFile(filepath.Join(agentCgroup, "cgroup.procs"), pid, 0) })
	return e
}

func echoServe(tb testing.TB, ln net.Listener) {
	var wg sync.WaitGroup
	tb.Cleanup(func() { ln.Close(); wg.Wait() })
	var mu sync.Mutex
	var conns []net.Conn
	tb.Cleanup(func() {
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { defer c.Close(); io.Copy(c, c) })
		}
	})
}

// benchProxy is a minimal agent: forward to the original destination, or
// terminate the bench ports itself.
func benchProxy(tb testing.TB, c *Capture, ep *EnrolledPod) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	track := func(cs ...net.Conn) { mu.Lock(); open = append(open, cs...); mu.Unlock() }
	tb.Cleanup(func() {
		ep.Listeners.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	for _, ln := range ep.Listeners.Outbound {
		wg.Go(func() {
			for {
				conn, dst, err := ep.AcceptOutbound(ln)
				if err != nil {
					return
				}
				track(conn)
				wg.Go(func() {
					defer conn.Close()
					switch dst.Port() {
					case benchEcho:
						io.Copy(onlyWriter{conn}, onlyReader{conn})
						return
					case benchSink:
						buf := make([]byte, 1<<20)
						for {
							if _, err := io.ReadFull(conn, buf); err != nil {
								return
							}
							conn.Write(buf[:1])
						}
					}
					d := inpod.Dialer{Netns: ep.Netns, Mark: c.Mark()}
					up, err := d.DialContext(context.Background(), "tcp", dst.String())
					if err != nil {
						return
					}
					track(up)
					defer up.Close()
					// Hide ReadFrom/WriteTo: io.Copy between two TCPConns
					// would splice(2), which misses sk_msg-redirected data.
					wg.Go(func() { io.Copy(onlyWriter{up}, onlyReader{conn}); up.CloseWrite() })
					io.Copy(onlyWriter{conn}, onlyReader{up})
				})
			}
		})
	}
}

// enterPod moves the calling goroutine, locked to its OS thread, into the
// pod's network namespace until the returned function is called.
func enterPod(b *testing.B, p *testPod) func() {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		b.Fatal(err)
	}
	target, err := os.Open(p.netns)
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		b.Fatal(err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		b.Fatal(err)
	}
	return func() {
		defer orig.Close()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			b.Errorf("leaving the pod namespace: %v (thread stays locked and dies)", err)
			return
		}
		runtime.UnlockOSThread()
	}
}

// dial connects from the current thread's namespace (see enterPod).
func dial(b *testing.B, addr string) *net.TCPConn {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	tc := c.(*net.TCPConn)
	tc.SetNoDelay(true)
	return tc
}

func rr(b *testing.B, c *net.TCPConn, msg, buf []byte) time.Duration {
	start := time.Now()
	if _, err := c.Write(msg); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}

func report(b *testing.B, unit string, nA, nB string, a, bb time.Duration) {
	n := float64(b.N)
	b.ReportMetric(float64(a.Nanoseconds())/n, nA+"-ns/"+unit)
	b.ReportMetric(float64(bb.Nanoseconds())/n, nB+"-ns/"+unit)
	b.ReportMetric(float64(a)/float64(bb), nA+"/"+nB)
}

// BenchmarkConnect: time for connect() to return, captured (redirected to
// the agent's 15001 listener in the pod; the agent's own connect upstream
// happens after) vs direct (to the other pod).
func BenchmarkConnect(b *testing.B) {
	e := newBenchEnv(b)
	dst, direct8081 := netip.AddrPortFrom(e.b.ip4, 8080).String(), netip.AddrPortFrom(e.b.ip4, 8081).String()
	defer enterPod(b, e.a)()
	var capt, direct time.Duration
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		c1 := dial(b, dst)
		t1 := time.Now()
		c2 := dial(b, direct8081)
		t2 := time.Now()
		capt += t1.Sub(t0)
		direct += t2.Sub(t1)
		c1.Close()
		c2.Close()
	}
	report(b, "connect", "captured", "direct", capt, direct)
}

// BenchmarkRequestResponse: 64-byte ping-pong on an open connection to an
// echo server in another pod, through the agent vs direct.
func BenchmarkRequestResponse(b *testing.B) {
	e := newBenchEnv(b)
	defer enterPod(b, e.a)()
	c1 := dial(b, netip.AddrPortFrom(e.b.ip4, 8080).String())
	c2 := dial(b, netip.AddrPortFrom(e.b.ip4, 8081).String())
	defer c1.Close()
	defer c2.Close()
	msg, buf := make([]byte, 64), make([]byte, 64)
	rr(b, c1, msg, buf)
	rr(b, c2, msg, buf)
	var capt, direct time.Duration
	b.ReportAllocs()
	for b.Loop() {
		capt += rr(b, c1, msg, buf)
		direct += rr(b, c2, msg, buf)
	}
	report(b, "rr", "captured", "direct", capt, direct)
}

// BenchmarkSameNodeAccelLatency: 64-byte ping-pong between the app and the
// agent (which answers itself), with sk_msg acceleration on vs off.
func BenchmarkSameNodeAccelLatency(b *testing.B) {
	e := newBenchEnv(b)
	on, off := e.accelPair(b, benchEcho)
	msg, buf := make([]byte, 64), make([]byte, 64)
	rr(b, on, msg, buf)
	rr(b, off, msg, buf)
	var tOn, tOff time.Duration
	b.ReportAllocs()
	for b.Loop() {
		tOn += rr(b, on, msg, buf)
		tOff += rr(b, off, msg, buf)
	}
	report(b, "rr", "accel", "noaccel", tOn, tOff)
}

// BenchmarkSameNodeAccelThroughput: 1 MiB blocks from the app to the agent
// (acknowledged per block), with sk_msg acceleration on vs off.
func BenchmarkSameNodeAccelThroughput(b *testing.B) {
	e := newBenchEnv(b)
	on, off := e.accelPair(b, benchSink)
	block, ack := make([]byte, 1<<20), make([]byte, 1)
	rr(b, on, block, ack)
	rr(b, off, block, ack)
	var tOn, tOff time.Duration
	b.ReportAllocs()
	for b.Loop() {
		tOn += rr(b, on, block, ack)
		tOff += rr(b, off, block, ack)
	}
	n := float64(b.N) * float64(len(block)) / (1 << 20)
	b.ReportMetric(n/tOn.Seconds(), "accel-MiB/s")
	b.ReportMetric(n/tOff.Seconds(), "noaccel-MiB/s")
	b.ReportMetric(float64(tOff)/float64(tOn), "accel-speedup")
}

// accelPair opens one captured connection with acceleration on and one
// with it off (the flag is read when a connection is established).
func (e *benchEnv) accelPair(b *testing.B, port uint16) (on, off *net.TCPConn) {
	if ok, why := e.c.Accel(); !ok {
		b.Fatalf("acceleration unavailable: %s", why)
	}
	dst := netip.AddrPortFrom(e.b.ip4, port).String()
	before, _ := e.c.Stats()
	leave := enterPod(b, e.a)
	on = dial(b, dst)
	if err := e.c.SetAccel(false); err != nil {
		b.Fatal(err)
	}
	off = dial(b, dst)
	leave()
	if err := e.c.SetAccel(true); err != nil {
		b.Fatal(err)
	}
	after, _ := e.c.Stats()
	if after["sockhash_added"]-before["sockhash_added"] != 2 {
		b.Fatalf("expected exactly the accelerated connection's two sockets in the sockhash, stats %v", after)
	}
	b.Cleanup(func() { on.Close(); off.Close() })
	return on, off
}

type onlyReader struct{ io.Reader }
type onlyWriter struct{ io.Writer }
