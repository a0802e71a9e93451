package load

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxWatch bounds Config.WatchPids.
const maxWatch = 64

// ProcessCPU returns the CPU time pid has used so far, in nanoseconds: the
// sum of its threads' on-CPU time from /proc/<pid>/task/*/schedstat, or,
// where schedstat is missing, utime+stime from /proc/<pid>/stat (10 ms
// resolution).
func ProcessCPU(pid int) (int64, error) {
	base := "/proc/" + strconv.Itoa(pid)
	tasks, err := filepath.Glob(base + "/task/*/schedstat")
	if err != nil || len(tasks) == 0 {
		return statCPU(base + "/stat")
	}
	var sum int64
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread exited meanwhile
		}
		f := strings.Fields(string(b))
		if len(f) < 1 {
			continue
		}
		v, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parsing %s: %w", t, err)
		}
		sum += v
	}
	if _, err := os.Stat(base); err != nil {
		return 0, fmt.Errorf("process %d: %w", pid, err)
	}
	return sum, nil
}

func statCPU(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w", path, err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parsing %s: no command field", path)
	}
	f := strings.Fields(string(b[i+1:]))
	// After "(comm)": state is field 3 of the line, utime 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("parsing %s: %d fields", path, len(f))
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parsing %s: bad utime/stime", path)
	}
	// USER_HZ is 100 on every Linux architecture Go supports.
	return (u + st) * 10_000_000, nil
}

// cpuWatch reads the CPU time of some processes at the edges of the
// measured window, so that what a proxy spends on warm-up, on connection
// setup before it, and on the worker's start and exit is not charged to
// the requests of the window.
type cpuWatch struct {
	pids   []int
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	from     []int64
	fromAt   time.Time
	to       []int64
	toAt     time.Time
	firstErr error
}

func startCPUWatch(ctx context.Context, pids []int, from, to time.Time) *cpuWatch {
	ctx, cancel := context.WithCancel(ctx)
	c := &cpuWatch{pids: pids, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		if !sleepUntil(ctx, from) {
			return
		}
		c.sample(&c.from, &c.fromAt)
		if sleepUntil(ctx, to) {
			c.sample(&c.to, &c.toAt)
		}
	}()
	return c
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	tm := time.NewTimer(time.Until(t))
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (c *cpuWatch) sample(dst *[]int64, at *time.Time) {
	v := make([]int64, len(c.pids))
	now := time.Now()
	for i, p := range c.pids {
		n, err := ProcessCPU(p)
		if err != nil {
			c.mu.Lock()
			if c.firstErr == nil {
				c.firstErr = err
			}
			c.mu.Unlock()
			return
		}
		v[i] = n
	}
	c.mu.Lock()
	*dst, *at = v, now
	c.mu.Unlock()
}

// finish ends the watch when the workload has ended and returns each
// process's CPU time over the window and the window's length. A workload
// that ended before the window's planned end closes it there.
func (c *cpuWatch) finish() ([]int64, time.Duration, error) {
	c.cancel()
	<-c.done
	c.mu.Lock()
	missing := c.to == nil
	c.mu.Unlock()
	if missing && c.from != nil {
		c.sample(&c.to, &c.toAt)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.firstErr != nil {
		return nil, 0, fmt.Errorf("watching the proxies' CPU: %w", c.firstErr)
	}
	if c.from == nil || c.to == nil {
		return nil, 0, fmt.Errorf("watching the proxies' CPU: the workload ended before its measured window began")
	}
	out := make([]int64, len(c.pids))
	for i := range out {
		out[i] = c.to[i] - c.from[i]
	}
	return out, c.toAt.Sub(c.fromAt), nil
}
