// Package procs sizes the agent's GOMAXPROCS to its load.
//
// A node agent relays many small exchanges, and at low and moderate load
// each one finds the Go runtime idle: the goroutine woken by the poller
// runs, and because other Ps are idle the runtime wakes a second thread to
// look for work, which finds none and goes back to sleep. That hand-off
// (futex wake, spinning, futex sleep) can cost more CPU than the relay
// itself. With one P there is nobody to wake: the thread that waits in
// epoll runs the goroutine and returns to epoll, as an event-loop proxy
// does. One P is also a ceiling, so the controller adds Ps while the agent
// keeps them busy and takes them back when the load falls.
package procs

import (
	"context"
	"log/slog"
	"math"
	"runtime"
	"syscall"
	"time"
)

// Policy decides the number of Ps from the measured CPU use.
type Policy struct {
	Min, Max int
	// Up: add Ps when the agent used more than Up of the Ps it has
	// (0.7: 0.7 cores busy of one P).
	Up float64
	// Down: remove a P when the load would use less than Down of one P
	// fewer, for DownAfter samples in a row.
	Down      float64
	DownAfter int
}

// DefaultPolicy adapts between one P and max.
func DefaultPolicy(max int) Policy {
	return Policy{Min: 1, Max: max, Up: 0.7, Down: 0.4, DownAfter: 4}
}

// Next returns the number of Ps after a sample in which the process used
// cores CPU cores on average with cur Ps; low counts the samples in a row
// that were low enough to shrink, and is updated.
func (p Policy) Next(cur int, cores float64, low *int) int {
	switch {
	case cur < p.Min:
		*low = 0
		return p.Min
	case cur > p.Max:
		*low = 0
		return p.Max
	case cores > p.Up*float64(cur) && cur < p.Max:
		// Grow at once to what the load needs, so that a burst is not
		// served by one P for several samples.
		*low = 0
		want := int(math.Ceil(cores / p.Up))
		return min(max(want, cur+1), p.Max)
	case cur > p.Min && cores < p.Down*float64(cur-1):
		*low++
		if *low >= p.DownAfter {
			*low = 0
			return cur - 1
		}
		return cur
	default:
		*low = 0
		return cur
	}
}

// Run samples the process's CPU time every interval and sets GOMAXPROCS by
// policy until ctx ends; then it restores the number it found. Calling
// runtime.GOMAXPROCS turns off the runtime's own updates from the cgroup
// CPU limit, so policy.Max should be the runtime's value at start, which
// already honours that limit.
func Run(ctx context.Context, policy Policy, interval time.Duration, log *slog.Logger) {
	run(ctx, policy, interval, log, cpuTime)
}

func run(ctx context.Context, policy Policy, interval time.Duration, log *slog.Logger, cpuTime func() time.Duration) {
	start := runtime.GOMAXPROCS(0)
	cur := min(max(1, policy.Min), policy.Max)
	runtime.GOMAXPROCS(cur)
	defer runtime.GOMAXPROCS(start)
	log.Info("sizing GOMAXPROCS to the load", "min", policy.Min, "max", policy.Max, "now", cur)
	t := time.NewTicker(interval)
	defer t.Stop()
	last, lastAt := cpuTime(), time.Now()
	low := 0
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			c := cpuTime()
			cores := float64(c-last) / float64(now.Sub(lastAt))
			last, lastAt = c, now
			if next := policy.Next(cur, cores, &low); next != cur {
				log.Debug("GOMAXPROCS", "from", cur, "to", next, "cores", math.Round(cores*100)/100)
				runtime.GOMAXPROCS(next)
				cur = next
			}
		}
	}
}

// cpuTime is the user and system CPU time of the process.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
