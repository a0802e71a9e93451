package dataplane_test

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// series sums the samples of a counter per reporter label.
func series(t *testing.T, reg *prometheus.Registry, name string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reporter" {
					out[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	return out
}

// TestLongLivedConnectionMetrics: the Istio byte counters of an open
// HBONE connection move at each scrape, on both agents' sides and in
// Istio's directions (received = request bytes, sent = response bytes),
// and the close adds only what was not counted yet.
func TestLongLivedConnectionMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := admin.NewMetrics(reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	obs := telemetry.New(telemetry.Config{Metrics: m, State: st.Snapshot})
	f := newFixture(t, obs)
	f.tunneledPair()
	// The application answers each request with twice as many bytes, so
	// that a swapped direction shows.
	app := doublingServer(t, "127.0.0.12")

	pa := f.capture.Pod("mesh/a")
	pa.SetDst(app)
	c, err := net.Dial("tcp", pa.Outbound.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	exchange := func(n int) {
		t.Helper()
		if _, err := c.Write(bytes.Repeat([]byte("x"), n)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 2*n)); err != nil {
			t.Fatal(err)
		}
	}
	both := func(v float64) map[string]float64 { return map[string]float64{"source": v, "destination": v} }
	waitBytes := func(what string, request, response float64) {
		t.Helper()
		waitfor.True(t, 20*time.Second, what, func() bool {
			return equal(series(t, reg, "istio_tcp_received_bytes_total"), both(request)) &&
				equal(series(t, reg, "istio_tcp_sent_bytes_total"), both(response))
		})
	}

	exchange(1000)
	waitBytes("the first exchange's bytes while the connection is open", 1000, 2000)
	if got := series(t, reg, "istio_tcp_connections_closed_total"); len(got) != 0 {
		t.Fatalf("closed connections %v while the connection is open", got)
	}
	exchange(500)
	waitBytes("the second exchange's bytes while the connection is open", 1500, 3000)
	if got := series(t, reg, "istio_tcp_connections_closed_total"); len(got) != 0 {
		t.Fatalf("closed connections %v while the connection is open", got)
	}

	c.Close()
	waitfor.True(t, 20*time.Second, "both agents to count the close", func() bool {
		return equal(series(t, reg, "istio_tcp_connections_closed_total"), both(1))
	})
	// Nothing counted twice.
	if got := series(t, reg, "istio_tcp_received_bytes_total"); !equal(got, both(1500)) {
		t.Errorf("request bytes after close %v, want 1500 each", got)
	}
	if got := series(t, reg, "istio_tcp_sent_bytes_total"); !equal(got, both(3000)) {
		t.Errorf("response bytes after close %v, want 3000 each", got)
	}
	if got := series(t, reg, "istio_tcp_connections_opened_total"); !equal(got, both(1)) {
		t.Errorf("opened %v, want 1 each", got)
	}
}

func equal(a, b map[string]float64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// doublingServer answers every byte it reads with two.
func doublingServer(t *testing.T, ip string) netip.AddrPort {
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := c.Write(bytes.Repeat(buf[:n], 2)); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}
