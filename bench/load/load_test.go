package load

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/bench/hist"
)

// startServer runs a Server on loopback for the test.
func startServer(t *testing.T) (httpAddr, echoAddr, sinkAddr string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{Size: 1024}
	if err := s.Listen(ctx, "127.0.0.1", 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = s.Serve(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return s.Addrs()
}

func mustHist(t *testing.T, s hist.Snapshot) *hist.Hist {
	t.Helper()
	h, err := hist.FromSnapshot(s)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// These tests check that each workload really talks to the server and
// accounts consistently; they assert no timings.
func TestWorkloadsAgainstLoopbackServer(t *testing.T) {
	h, e, s := startServer(t)
	ctx := context.Background()
	for _, cfg := range []Config{
		{Kind: KindHTTP, Addr: h, Conns: 4, Rate: 400, Size: 1024, Warmup: 50 * time.Millisecond, Duration: 300 * time.Millisecond},
		{Kind: KindRR, Addr: e, Duration: 100 * time.Millisecond},
		{Kind: KindCRR, Addr: e, Warmup: 20 * time.Millisecond, Duration: 100 * time.Millisecond},
		{Kind: KindBulk, Addr: s, Warmup: 20 * time.Millisecond, Duration: 100 * time.Millisecond},
	} {
		r, err := Run(ctx, nil, cfg)
		if err != nil {
			t.Fatalf("%s: %v", cfg.Kind, err)
		}
		if r.Errors != 0 {
			t.Errorf("%s: %d errors, first %s", cfg.Kind, r.Errors, r.FirstError)
		}
		if cfg.Kind == KindBulk {
			if r.BytesPerSec <= 0 {
				t.Errorf("bulk: no throughput")
			}
			continue
		}
		lat := mustHist(t, r.Latency)
		if r.Requests == 0 || lat.Count() != r.Requests {
			t.Errorf("%s: %d requests, %d latencies", cfg.Kind, r.Requests, lat.Count())
		}
		if lat.Quantile(0.5) > lat.Quantile(0.99) || lat.Quantile(0.99) > lat.Quantile(0.999) {
			t.Errorf("%s: percentiles not monotonic", cfg.Kind)
		}
		if cfg.Kind == KindHTTP {
			// Open loop: the count is fixed by the schedule, not by speed.
			want := uint64(cfg.Rate * cfg.Duration.Seconds())
			if r.Requests+r.Errors != want {
				t.Errorf("http: %d requests + %d errors, the schedule has %d in the window", r.Requests, r.Errors, want)
			}
		}
	}
}

func TestHTTPReportsAMissingServer(t *testing.T) {
	_, e, _ := startServer(t)
	// The echo port does not speak HTTP: responses cannot parse.
	_, err := Run(context.Background(), nil, Config{Kind: KindHTTP, Addr: "127.0.0.1:1", Conns: 1, Rate: 10, Size: 1, Duration: 10 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "opening connection") {
		t.Fatalf("closed port: %v", err)
	}
	r, err := Run(context.Background(), nil, Config{Kind: KindHTTP, Addr: e, Conns: 1, Rate: 50, Size: 8, Duration: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if r.Errors == 0 || r.FirstError == "" {
		t.Fatalf("echo server answered HTTP without errors: %+v", r)
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{Kind: KindHTTP, Addr: "127.0.0.1:80", Conns: 1, Rate: 1000, Size: 1024, Duration: time.Second}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Config){
		"kind":     func(c *Config) { c.Kind = "udp" },
		"conns":    func(c *Config) { c.Conns = 0 },
		"rate":     func(c *Config) { c.Rate = 0 },
		"size":     func(c *Config) { c.Size = -1 },
		"addr":     func(c *Config) { c.Addr = "nowhere" },
		"duration": func(c *Config) { c.Duration = 0 },
	} {
		c := ok
		mut(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func BenchmarkHTTPLoopback(b *testing.B) {
	b.ReportAllocs()
	h, _, _ := startServerB(b)
	c := &httpConn{d: nil, addr: h}
	c.d = dialer{}
	req := httpRequest(h, 1024)
	defer c.close()
	for b.Loop() {
		if err := c.do(context.Background(), req, 1024); err != nil {
			b.Fatal(err)
		}
	}
}

// slowServer answers HTTP after a fixed delay, far slower than the rate.
func TestHTTPCountsRequestsAPathCannotCarry(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(200 * time.Millisecond)
		w.Header().Set("Content-Length", "4")
		_, _ = w.Write([]byte("abcd"))
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	// 200 requests/s on one connection for 0.5 s against a 5/s server:
	// most are never sent before the hard stop (2 s after the window).
	cfg := Config{Kind: KindHTTP, Addr: ln.Addr().String(), Conns: 1, Rate: 200, Size: 4, Duration: 500 * time.Millisecond}
	r, err := Run(context.Background(), nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests+r.Errors != 100 {
		t.Errorf("%d requests + %d errors, the window holds 100", r.Requests, r.Errors)
	}
	if r.Errors == 0 || !strings.Contains(r.FirstError, "could not sustain") {
		t.Errorf("unsent requests not reported: %+v", r)
	}
	// Queued requests are charged their wait: the slowest is far beyond
	// the 200 ms service time.
	h := mustHist(t, r.Latency)
	if h.Max() < int64(500*time.Millisecond) {
		t.Errorf("max latency %v: queueing behind slow responses not charged", time.Duration(h.Max()))
	}
}
