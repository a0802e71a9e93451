package hbone_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t testing.TB) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() {
		a.Close()
		r.c.Close()
	})
	return a.(*net.TCPConn), r.c.(*net.TCPConn)
}

// relayEnv is a client pool and a server whose handler relays every
// tunnel to the application function app, over real TCP sockets on both
// ends, as the proxy does.
type relayEnv struct {
	*env
	pool *hbone.Pool
	srv  *hbone.Server
	addr hbone.Key
	wg   sync.WaitGroup
	errs chan error
}

func newRelayEnv(t testing.TB, app func(net.Conn), tweakPool func(*hbone.PoolConfig)) *relayEnv {
	t.Helper()
	e := &relayEnv{env: newEnv(t), errs: make(chan error, 1024)}
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		if tun.Accept() != nil {
			return
		}
		agent, appEnd := tcpPair(t)
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			defer appEnd.Close()
			app(appEnd)
		}()
		var sent, recv atomic.Int64
		if err := tun.Relay(agent, &sent, &recv); err != nil {
			e.errs <- err
			tun.Reset()
		}
		agent.Close()
	})
	srv, addr := e.startServer(t, h, nil)
	e.srv = srv
	e.pool = e.newPool(t, tweakPool)
	e.addr = e.key(addr)
	t.Cleanup(e.wg.Wait)
	return e
}

// dial opens a tunnel and relays it to a new local socket pair; it
// returns the application's end and a channel with Relay's result.
func (e *relayEnv) dial(t testing.TB) (*net.TCPConn, chan error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	s, err := e.pool.Connect(ctx, hbone.ConnectRequest{Key: e.addr, Target: target})
	if err != nil {
		cancel()
		t.Fatalf("Connect: %v", err)
	}
	app, agent := tcpPair(t)
	done := make(chan error, 1)
	go func() {
		defer cancel()
		var sent, recv atomic.Int64
		err := s.Relay(agent, &sent, &recv)
		s.Close()
		agent.Close()
		done <- err
	}()
	return app, done
}

func TestRelayDestinationHalfClosesFirst(t *testing.T) {
	// The destination sends a banner and half-closes; the source reads it
	// all, and only then sends its own bytes, which must still arrive.
	got := make(chan []byte, 1)
	e := newRelayEnv(t, func(c net.Conn) {
		c.Write([]byte("banner"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		got <- b
	}, nil)
	app, done := e.dial(t)
	app.SetDeadline(time.Now().Add(20 * time.Second))
	b, err := io.ReadAll(app)
	if err != nil || string(b) != "banner" {
		t.Fatalf("source read %q, %v; want banner then EOF", b, err)
	}
	if _, err := app.Write([]byte("late bytes after the destination's FIN")); err != nil {
		t.Fatal(err)
	}
	app.CloseWrite()
	if b := <-got; string(b) != "late bytes after the destination's FIN" {
		t.Fatalf("destination received %q after its half-close", b)
	}
	if err := <-done; err != nil {
		t.Fatalf("client Relay: %v", err)
	}
	select {
	case err := <-e.errs:
		t.Fatalf("server Relay: %v", err)
	default:
	}
}

func TestRelaySourceHalfClosesFirst(t *testing.T) {
	e := newRelayEnv(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		c.Write(append([]byte("got:"), b...))
	}, nil)
	app, done := e.dial(t)
	app.SetDeadline(time.Now().Add(20 * time.Second))
	app.Write([]byte("request"))
	app.CloseWrite()
	b, err := io.ReadAll(app)
	if err != nil || string(b) != "got:request" {
		t.Fatalf("read %q, %v", b, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("client Relay: %v", err)
	}
}

// TestRelayBulkBothWays moves several MiB each way at once through one
// tunnel, with a slow reader on one side, so that flow control, the
// drainer and the direct write path all run.
func TestRelayBulkBothWays(t *testing.T) {
	const size = 12 << 20
	down := randomBytes(t, size)
	sums := make(chan [32]byte, 1)
	e := newRelayEnv(t, func(c net.Conn) {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Write(down)
			c.(*net.TCPConn).CloseWrite()
		}()
		h := sha256.New()
		buf := make([]byte, 1000) // small reads: the agent's socket fills up
		io.CopyBuffer(h, c, buf)
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		sums <- sum
		wg.Wait()
	}, nil)
	up := randomBytes(t, size)
	app, done := e.dial(t)
	app.SetDeadline(time.Now().Add(120 * time.Second))
	go func() {
		app.Write(up)
		app.CloseWrite()
	}()
	got, err := io.ReadAll(app)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, down) {
		t.Fatalf("downstream: got %d bytes, want %d identical", len(got), len(down))
	}
	if <-sums != sha256.Sum256(up) {
		t.Fatal("upstream bytes differ")
	}
	if err := <-done; err != nil {
		t.Fatalf("client Relay: %v", err)
	}
}

func TestRelayResetPropagates(t *testing.T) {
	e := newRelayEnv(t, func(c net.Conn) {
		c.Write([]byte("x"))
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}, nil)
	app, done := e.dial(t)
	app.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadAll(app); err == nil {
		t.Log("source saw a clean EOF; checking Relay's result")
	}
	if err := <-done; err == nil {
		t.Fatal("client Relay returned nil after the destination reset")
	}
}

// TestRelayAfterReset starts Relay on a stream the peer has already
// reset: Relay must end at once instead of waiting for the application,
// which here never writes nor closes.
func TestRelayAfterReset(t *testing.T) {
	e := newEnv(t)
	h := handlerFunc(func(_ context.Context, _ *hbone.Request, tun *hbone.Tunnel) {
		if tun.Accept() == nil {
			tun.Reset()
		}
	})
	_, addr := e.startServer(t, h, nil)
	p := e.newPool(t, nil)
	s := connect(t, p, e.key(addr))
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("reading a reset stream ended cleanly, want the reset")
	}
	app, agent := tcpPair(t)
	_ = app // never written, never closed: only the reset can end Relay
	done := make(chan error, 1)
	go func() {
		var sent, recv atomic.Int64
		done <- s.Relay(agent, &sent, &recv)
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Relay on a reset stream returned nil")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Relay on an already reset stream still waits for the application")
	}
}

func TestScaleOutWhenBusy(t *testing.T) {
	e := newRelayEnv(t, func(c net.Conn) { io.Copy(c, c) }, func(c *hbone.PoolConfig) {
		c.ScaleOutStreams = 2
		c.MaxScaleOutConns = 2
	})
	var apps []*net.TCPConn
	for range 5 {
		app, _ := e.dial(t)
		apps = append(apps, app)
	}
	waitfor.True(t, 30*time.Second, "a second connection", func() bool { return e.pool.Stats().Conns == 2 })
	st := e.pool.Stats()
	if st.ScaleOuts != 1 || st.Handshakes != 2 || st.Misses != 1 {
		t.Fatalf("%+v: want 1 scale-out, 2 handshakes, 1 miss", st)
	}
	// New streams go to the least loaded connection now, all still work.
	for range 3 {
		app, _ := e.dial(t)
		apps = append(apps, app)
	}
	for i, app := range apps {
		app.SetDeadline(time.Now().Add(20 * time.Second))
		msg := []byte{byte(i), 1, 2, 3}
		app.Write(msg)
		buf := make([]byte, 4)
		if _, err := io.ReadFull(app, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Fatalf("stream %d: %q, %v", i, buf, err)
		}
	}
	if st := e.pool.Stats(); st.Conns != 2 || st.ScaleOuts != 1 {
		t.Fatalf("%+v: want still 2 connections (MaxScaleOutConns)", st)
	}
}

// TestResourcesPerConnection measures what connections and streams cost
// the engine: goroutines and heap. It logs the figures (docs/hbone.md
// quotes them) and checks the goroutine counts, which are exact.
func TestResourcesPerConnection(t *testing.T) {
	if testing.Short() {
		t.Skip("measures memory; not in -short")
	}
	// No scale-out here: the streams share one connection, so the counts
	// are exact.
	e := newRelayEnv(t, func(c net.Conn) { io.Copy(c, c) }, func(c *hbone.PoolConfig) { c.ScaleOutStreams = -1 })
	settle := func() (int, uint64) {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return runtime.NumGoroutine(), ms.HeapInuse
	}
	// Idle connections: one per source namespace.
	g0, h0 := settle()
	const nConns = 40
	var streams []*hbone.Stream
	for i := range nConns {
		key := e.addr
		key.SrcNetns = "ns" + string(rune('a'+i%26)) + string(rune('a'+i/26))
		s := connect(t, e.pool, key)
		roundTrip(t, s, []byte("warm"))
		streams = append(streams, s)
	}
	for _, s := range streams {
		s.Close()
	}
	waitfor.True(t, 30*time.Second, "streams to end", func() bool { return e.srv.Stats().Streams == 0 && e.pool.Stats().Streams == 0 })
	g1, h1 := settle()
	perConnG := float64(g1-g0) / nConns
	perConnB := float64(int64(h1)-int64(h0)) / nConns
	// Streams relayed between sockets, idle, on one connection.
	const nStreams = 50
	var apps []*net.TCPConn
	for range nStreams {
		app, _ := e.dial(t)
		app.SetDeadline(time.Now().Add(20 * time.Second))
		app.Write([]byte("ping"))
		buf := make([]byte, 4)
		if _, err := io.ReadFull(app, buf); err != nil {
			t.Fatal(err)
		}
		apps = append(apps, app)
	}
	g2, h2 := settle()
	// Each stream here has: the client relay goroutine (the caller's own
	// in the proxy), the server's handler goroutine (which relays), and
	// this test's echo application goroutine; the engine adds none.
	perStreamG := float64(g2-g1) / nStreams
	perStreamB := float64(int64(h2)-int64(h1)) / nStreams
	t.Logf("per idle connection (both ends, TLS + HTTP/2): %.1f goroutines, %.0f bytes of heap", perConnG, perConnB)
	t.Logf("per open relayed stream (both ends, incl. 4 test sockets and the echo app): %.1f goroutines, %.0f bytes of heap", perStreamG, perStreamB)
	// Exact counts would race with goroutines that are about to end
	// (accept helpers of tcpPair); allow a little slack, not one more per
	// connection or stream.
	if g1-g0 > 4*nConns+10 {
		t.Errorf("%d idle connections cost %d goroutines, want 4 each (read loop and keeper at each end)", nConns, g1-g0)
	}
	if g2-g1 > 3*nStreams+10 {
		t.Errorf("%d relayed streams cost %d goroutines, want 3 each (client relay, server handler, test app)", nStreams, g2-g1)
	}
	for _, app := range apps {
		app.Close()
	}
}
