package retry

import (
	"sync"
	"testing"
	"time"
)

func TestBudget(t *testing.T) {
	for _, tc := range []struct {
		name          string
		percent       float64
		min, requests int
		wantRetries   int
	}{
		{"min applies to a quiet service", 20, 3, 1, 3},
		{"20% of 100", 20, 3, 100, 20},
		{"20% of 10 is below min", 20, 3, 10, 3},
		{"no min", 20, 0, 4, 0},
		{"zero percent, min 1", 0, 1, 1000, 1},
		{"negative values count as zero", -5, -1, 100, 0},
	} {
		b := NewBudget(tc.percent, tc.min)
		var dones []func()
		for range tc.requests {
			dones = append(dones, b.Request())
		}
		got := 0
		var rdones []func()
		for range tc.requests + 10 {
			done, ok := b.Retry()
			if !ok {
				break
			}
			got++
			rdones = append(rdones, done)
		}
		if got != tc.wantRetries {
			t.Errorf("%s: %d retries allowed, want %d", tc.name, got, tc.wantRetries)
		}
		for _, d := range rdones {
			d()
			d() // idempotent
		}
		for _, d := range dones {
			d()
		}
		if r, rt := b.InFlight(); r != 0 || rt != 0 {
			t.Errorf("%s: in flight after done: %d requests, %d retries", tc.name, r, rt)
		}
	}
}

// Begin and End count a request in flight as Request and its done do, and
// the retries allowed follow them.
func TestBudgetBeginEnd(t *testing.T) {
	b := NewBudget(20, 0)
	for range 10 {
		b.Begin()
	}
	done := b.Request()
	if r, _ := b.InFlight(); r != 11 {
		t.Fatalf("%d requests in flight, want 11", r)
	}
	rdone, ok := b.Retry()
	if !ok {
		t.Fatal("no retry allowed with 11 requests at 20%")
	}
	rdone()
	for range 10 {
		b.End()
	}
	done()
	done() // idempotent
	if r, rt := b.InFlight(); r != 0 || rt != 0 {
		t.Fatalf("in flight after End: %d requests, %d retries", r, rt)
	}
	if _, ok := b.Retry(); ok {
		t.Fatal("a retry allowed with nothing in flight and no minimum")
	}
}

// TestBudgetOutage simulates a destination that fails every request: with
// 100 requests in flight, each wanting 3 retries, the retries made at once
// are capped at the budget, so the load stays at most 1.2× instead of 4×.
func TestBudgetOutage(t *testing.T) {
	b := NewBudget(DefaultPercent, DefaultMinConcurrency)
	const n = 100
	var reqDone, retryDone []func()
	for range n {
		reqDone = append(reqDone, b.Request())
	}
	attempts := n
	for range n {
		for range 3 {
			done, ok := b.Retry()
			if !ok {
				break
			}
			attempts++
			retryDone = append(retryDone, done)
		}
	}
	if max := n + n*DefaultPercent/100; attempts > max {
		t.Fatalf("%d attempts in flight for %d requests, budget allows %d", attempts, n, max)
	}
	// A retry that ends gives its place back.
	retryDone[0]()
	if _, ok := b.Retry(); !ok {
		t.Fatal("retry refused after one ended")
	}
	for _, d := range append(reqDone, retryDone...) {
		d()
	}
}

func TestBudgetConcurrent(t *testing.T) {
	b := NewBudget(50, 2)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				done := b.Request()
				if rd, ok := b.Retry(); ok {
					rd()
				}
				done()
			}
		})
	}
	wg.Wait()
	if r, rt := b.InFlight(); r != 0 || rt != 0 {
		t.Fatalf("in flight after all done: %d, %d", r, rt)
	}
}

func TestBudgets(t *testing.T) {
	bs := NewBudgets(20, 3)
	a, a2, c := bs.For("ns/a"), bs.For("ns/a"), bs.For("ns/c")
	if a != a2 || a == c {
		t.Fatal("For must return one budget per destination")
	}
	done := a.Request()
	bs.Sweep()
	if bs.Len() != 1 {
		t.Fatalf("after sweep %d budgets, want 1 (ns/a is busy)", bs.Len())
	}
	done()
	bs.Sweep()
	if bs.Len() != 0 {
		t.Fatalf("after sweep %d budgets, want 0", bs.Len())
	}
}

func TestBackoff(t *testing.T) {
	zero := func(int64) int64 { return 0 }
	top := func(n int64) int64 { return n - 1 }
	base := 100 * time.Millisecond
	for _, tc := range []struct {
		attempt  int
		jitter   func(int64) int64
		min, max time.Duration
	}{
		{1, zero, base, base},
		{2, zero, 2 * base, 2 * base},
		{3, zero, 4 * base, 4 * base},
		{4, zero, 8 * base, 8 * base},
		{5, zero, 10 * base, 10 * base},
		{50, zero, 10 * base, 10 * base},
		{1, top, base, base + base/2},
		{50, top, 10 * base, 15 * base},
	} {
		got := Backoff(base, tc.attempt, tc.jitter)
		if got < tc.min || got > tc.max {
			t.Errorf("Backoff(%v, %d) = %v, want %v..%v", base, tc.attempt, got, tc.min, tc.max)
		}
	}
	if got := Backoff(0, 3, top); got != 0 {
		t.Errorf("Backoff(0) = %v, want 0", got)
	}
	if got := Backoff(time.Nanosecond, 1, top); got != time.Nanosecond {
		t.Errorf("Backoff(1ns) = %v", got)
	}
}
