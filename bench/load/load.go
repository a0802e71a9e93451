// Package load is nodemesh's own load generator and the servers it talks
// to, so the benchmark needs nothing downloaded:
//
//   - HTTP: open-loop HTTP/1.1 with a 1 kB request and a 1 kB response at a
//     fixed rate over a fixed number of persistent connections, latency
//     corrected for coordinated omission (see Corrector);
//   - RR: closed-loop 1-byte request/response on one connection (like
//     netperf TCP_RR);
//   - CRR: a new connection for every 1-byte request/response (like
//     netperf TCP_CRR);
//   - Bulk: one stream written as fast as possible (like iperf3), measured
//     at the receiver.
//
// Latencies go into hist histograms (nanoseconds). Nothing here knows about
// meshes or labs: callers pass the address and run it where they want.
package load

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/nodemesh/nodemesh/bench/hist"
)

// Kinds of workload.
const (
	KindHTTP = "http"
	KindRR   = "rr"
	KindCRR  = "crr"
	KindBulk = "bulk"
)

// Config is one workload run.
type Config struct {
	Kind string `json:"kind"`
	// Addr is host:port of the server.
	Addr string `json:"addr"`
	// Addrs, when set (HTTP only), spreads the connections over several
	// servers: connection i goes to Addrs[i%len(Addrs)]; Addr is unused.
	Addrs []string `json:"addrs,omitempty"`
	// Conns is the number of connections (HTTP; RR and CRR use 1 stream,
	// Bulk 1).
	Conns int `json:"conns,omitempty"`
	// Rate is the total requests/s (HTTP only; the others are closed loop).
	Rate float64 `json:"rate,omitempty"`
	// Size is the HTTP request and response body size in bytes.
	Size int `json:"size,omitempty"`
	// Warmup runs the workload without recording, Duration with.
	Warmup   time.Duration `json:"warmup"`
	Duration time.Duration `json:"duration"`
	// WatchPids are processes (the proxies under test) whose CPU time the
	// run reads at the edges of the measured window: Result.WatchCPU.
	WatchPids []int `json:"watchPids,omitempty"`
}

// Validate reports a config that cannot be run, with what to change.
func (c *Config) Validate() error {
	switch c.Kind {
	case KindHTTP:
		if c.Conns < 1 || c.Conns > 4096 {
			return fmt.Errorf("http workload: %d connections; use 1-4096", c.Conns)
		}
		if !(c.Rate > 0) || c.Rate > 1e6 {
			return fmt.Errorf("http workload: rate %v/s; use a rate above 0 and at most 1e6", c.Rate)
		}
		if c.Size < 0 || c.Size > 1<<20 {
			return fmt.Errorf("http workload: body size %d; use 0-1048576 bytes", c.Size)
		}
	case KindRR, KindCRR, KindBulk:
	default:
		return fmt.Errorf("unknown workload kind %q (use %s, %s, %s or %s)", c.Kind, KindHTTP, KindRR, KindCRR, KindBulk)
	}
	addrs := c.Addrs
	if len(addrs) == 0 {
		addrs = []string{c.Addr}
	} else if c.Kind != KindHTTP {
		return fmt.Errorf("%s workload: several addresses are only for http", c.Kind)
	}
	for _, a := range addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("workload address %q: %w", a, err)
		}
	}
	if len(c.WatchPids) > maxWatch {
		return fmt.Errorf("%d processes to watch; at most %d", len(c.WatchPids), maxWatch)
	}
	for _, p := range c.WatchPids {
		if p <= 0 {
			return fmt.Errorf("process to watch %d: use a process ID above 0", p)
		}
	}
	if c.Duration <= 0 || c.Warmup < 0 {
		return fmt.Errorf("workload duration %v, warm-up %v: the duration must be positive", c.Duration, c.Warmup)
	}
	return nil
}

// Result is what one run measured.
type Result struct {
	Config Config `json:"config"`
	// Requests completed in the measured window (transactions for RR and
	// CRR); Errors failed there (timeouts, resets, bad responses).
	Requests uint64 `json:"requests"`
	Errors   uint64 `json:"errors"`
	// FirstError describes one failure, for the report.
	FirstError string `json:"firstError,omitempty"`
	// Elapsed is the measured window as it really lasted.
	Elapsed time.Duration `json:"elapsed"`
	// RPS is Requests/Elapsed.
	RPS float64 `json:"rps"`
	// BytesPerSec is the payload throughput (both directions for HTTP, the
	// stream for Bulk).
	BytesPerSec float64 `json:"bytesPerSec"`
	// Latency of each request in ns (HTTP: corrected for coordinated
	// omission; RR/CRR: round trip incl. connect for CRR). Empty for Bulk.
	Latency hist.Snapshot `json:"latency"`
	// SendLag (HTTP) is how late the generator itself sent requests that
	// were not held up by the system: its timer overshoot, not charged.
	SendLag hist.Snapshot `json:"sendLag"`
	// WatchCPU is the CPU time in ns each of Config.WatchPids used during
	// the measured window, which lasted WatchWall (the two readings'
	// distance: within a scheduling delay of the window).
	WatchCPU  []int64       `json:"watchCpu,omitempty"`
	WatchWall time.Duration `json:"watchWall,omitempty"`
}

// Run runs the workload described by cfg, dialling with d.
func Run(ctx context.Context, d Dialer, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if d == nil {
		d = &net.Dialer{}
	}
	var cw *cpuWatch
	if len(cfg.WatchPids) > 0 {
		s := time.Now()
		cw = startCPUWatch(ctx, cfg.WatchPids, s.Add(cfg.Warmup), s.Add(cfg.Warmup+cfg.Duration))
	}
	var r *Result
	var err error
	switch cfg.Kind {
	case KindHTTP:
		r, err = runHTTP(ctx, d, cfg)
	case KindRR:
		r, err = runRR(ctx, d, cfg)
	case KindCRR:
		r, err = runCRR(ctx, d, cfg)
	default:
		r, err = runBulk(ctx, d, cfg)
	}
	if cw != nil {
		cpu, wall, werr := cw.finish()
		if err == nil && werr != nil {
			err = werr
		}
		if r != nil {
			r.WatchCPU, r.WatchWall = cpu, wall
		}
	}
	return r, err
}

// Dialer opens connections to the server; *net.Dialer is one.
type Dialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// ioTimeout bounds every single request: a stuck request becomes an
// error, not a hung benchmark.
const ioTimeout = 10 * time.Second

// window tracks the measured window: values before warm-up ends are not
// recorded, nor after the end.
type window struct {
	start, from, to time.Time
}

func newWindow(cfg Config) window {
	s := time.Now()
	return window{start: s, from: s.Add(cfg.Warmup), to: s.Add(cfg.Warmup + cfg.Duration)}
}

func (w window) in(t time.Time) bool { return !t.Before(w.from) && t.Before(w.to) }

// errSet keeps the count and first error of a worker.
type errSet struct {
	n     uint64
	first error
}

func (e *errSet) add(err error) {
	e.n++
	if e.first == nil {
		e.first = err
	}
}

func finish(cfg Config, lat, lag *hist.Hist, n uint64, errs errSet, elapsed time.Duration, bytes float64) *Result {
	r := &Result{Config: cfg, Requests: n, Errors: errs.n, Elapsed: elapsed}
	if errs.first != nil {
		r.FirstError = errs.first.Error()
	}
	if elapsed > 0 {
		r.RPS = float64(n) / elapsed.Seconds()
		r.BytesPerSec = bytes / elapsed.Seconds()
	}
	if lat != nil {
		r.Latency = lat.Snapshot()
	}
	if lag != nil {
		r.SendLag = lag.Snapshot()
	}
	return r
}

var errShort = errors.New("short response")
