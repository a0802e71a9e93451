package proxy_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// crrApp serves one request-response per connection, as a tcp-crr
// benchmark does: it reads a 16-byte request and answers 32 bytes. When
// the request starts with 'S' the server closes first; otherwise it waits
// for the client to close.
func crrApp(c net.Conn) {
	req := make([]byte, 16)
	if _, err := io.ReadFull(c, req); err != nil {
		return
	}
	if _, err := c.Write([]byte(strings.Repeat("r", 32))); err != nil {
		return
	}
	if req[0] == 'S' {
		return // the fixture closes c
	}
	io.Copy(io.Discard, c)
}

// crr opens one connection from pod A to dst, does one request-response
// and closes it. Odd i let the server close first, i%4 == 2 resets from
// the client.
func (f *fixture) crr(i int, dst netip.AddrPort) error {
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.outbound))
	if err != nil {
		return err
	}
	defer c.Close()
	f.dsts.set(addrOf2(c.LocalAddr()), dst)
	c.SetDeadline(time.Now().Add(60 * time.Second))
	req := []byte(fmt.Sprintf("C%015d", i))
	if i%2 == 1 {
		req[0] = 'S'
	}
	if _, err := c.Write(req); err != nil {
		return fmt.Errorf("connection %d: writing request: %w", i, err)
	}
	resp := make([]byte, 32)
	if _, err := io.ReadFull(c, resp); err != nil {
		return fmt.Errorf("connection %d: reading response: %w", i, err)
	}
	if i%4 == 2 {
		c.SetLinger(0)
	}
	return nil
}

// goroutines returns the number of goroutines and, for a failure message,
// a dump of their stacks.
func goroutines() (int, string) {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return runtime.NumGoroutine(), string(buf)
}

// TestShortConnectionsLeakNothing pushes many short connections (connect,
// one request, close; the way tcp-crr does) through outbound -> HBONE ->
// inbound and through passthrough, and checks that the proxies return
// every per-connection resource: goroutines, tracked connections, pool
// streams, balancer counts.
func TestShortConnectionsLeakNothing(t *testing.T) {
	n := 2000
	if testing.Short() {
		n = 300
	}
	f := newFixture(t, fixtureOpts{app: crrApp})
	dsts := []netip.AddrPort{svcVIP, f.b1.app, f.c.app}
	// Warm up: one tunnel to each enrolled pod, so the pool's connections
	// (and their goroutines) are part of the baseline.
	for i := range 8 {
		if err := f.crr(i, dsts[i%len(dsts)]); err != nil {
			t.Fatal(err)
		}
	}
	settled := func() bool {
		return len(f.node1.Connections()) == 0 && len(f.node2.Connections()) == 0 &&
			f.pool1.Stats().Streams == 0 && f.node1.InflightEndpoints() == 0
	}
	waitfor.True(t, 20*time.Second, "warm-up connections to end", settled)
	time.Sleep(100 * time.Millisecond)
	base, _ := goroutines()
	conns1 := f.pool1.Stats().Conns

	const workers = 8
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				if err := f.crr(i, dsts[i%len(dsts)]); err != nil {
					errc <- err
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

	waitfor.True(t, 20*time.Second, "connections to be untracked and pool streams released", settled)
	// Goroutines end a moment after the connections are untracked; allow
	// slack for runtime and HTTP/2 housekeeping, not for one per
	// connection.
	const slack = 10
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, stacks := goroutines()
		if got <= base+slack {
			t.Logf("%d connections: goroutines %d before, %d after", n, base, got)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d short connections %d goroutines remain, baseline %d:\n%s", n, got, base, stacks)
		}
		time.Sleep(50 * time.Millisecond)
	}
	st := f.pool1.Stats()
	if st.Streams != 0 || st.Conns > conns1+workers {
		t.Fatalf("pool after the burst: %+v (before: %d connections)", st, conns1)
	}
	if st.Hits+st.Misses < uint64(n*2/3) {
		t.Fatalf("pool saw %d streams, want about %d (two thirds of the connections are HBONE)", st.Hits+st.Misses, n*2/3)
	}
	_, closed1, refused1, _ := f.obs1.snapshot()
	_, closed2, refused2, _ := f.obs2.snapshot()
	if len(refused1)+len(refused2) != 0 {
		t.Fatalf("refused connections: %v %v", refused1, refused2)
	}
	if len(closed1) != n+8 {
		t.Fatalf("node 1 reported %d closed connections, want %d", len(closed1), n+8)
	}
	tunnelled := 0 // connections to the VIP or pod B1, not to pod C
	for i := range 8 {
		if i%len(dsts) != 2 {
			tunnelled++
		}
	}
	for i := range n {
		if i%len(dsts) != 2 {
			tunnelled++
		}
	}
	if len(closed2) != tunnelled {
		t.Fatalf("node 2 reported %d closed tunnels, want %d", len(closed2), tunnelled)
	}
}
