package procs

import (
	"context"
	"log/slog"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

func TestPolicyNext(t *testing.T) {
	p := DefaultPolicy(4)
	steps := []struct {
		cores float64
		want  int
	}{
		{0.1, 1},  // idle: one P
		{0.65, 1}, // busy, below the 0.7 mark
		{0.95, 2}, // one P nearly full: grow
		{2.5, 4},  // a burst: straight to what it needs, capped at Max
		{3.9, 4},  // at Max
		{1.0, 4},  // 1.0 < 0.4*3: low 1
		{1.0, 4},  // low 2
		{1.5, 4},  // not low (1.5 >= 1.2): the count starts over
		{1.0, 4},  // low 1
		{1.0, 4},  // low 2
		{1.0, 4},  // low 3
		{1.0, 3},  // low 4: shrink by one
		{0.5, 3},  // 0.5 < 0.8: low 1
		{0.5, 3},
		{0.5, 3},
		{0.5, 2},
		{0.3, 2},
		{0.3, 2},
		{0.3, 2},
		{0.3, 1},
		{0.3, 1}, // never below Min
	}
	cur, low := 1, 0
	for i, s := range steps {
		cur = p.Next(cur, s.cores, &low)
		if cur != s.want {
			t.Fatalf("step %d (%.2f cores): %d Ps, want %d", i, s.cores, cur, s.want)
		}
	}
}

func TestPolicyClamps(t *testing.T) {
	p := DefaultPolicy(2)
	low := 0
	if got := p.Next(8, 0.1, &low); got != 2 {
		t.Fatalf("above Max: %d, want 2", got)
	}
	if got := p.Next(0, 0.1, &low); got != 1 {
		t.Fatalf("below Min: %d, want 1", got)
	}
	if got := p.Next(2, 5, &low); got != 2 {
		t.Fatalf("overload at Max: %d, want 2", got)
	}
}

// TestRunFollowsLoad drives the controller with a fake CPU clock: a load
// far above one P grows GOMAXPROCS to Max, no load shrinks it back to one,
// and the value found at start is restored when Run ends.
func TestRunFollowsLoad(t *testing.T) {
	start := runtime.GOMAXPROCS(0)
	var busy atomic.Bool
	var cpu atomic.Int64
	clock := func() time.Duration {
		if busy.Load() {
			cpu.Add(int64(time.Hour)) // far more than any sample's wall time
		}
		return time.Duration(cpu.Load())
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		run(ctx, DefaultPolicy(2), 5*time.Millisecond, slog.New(slog.DiscardHandler), clock)
	}()
	waitProcs := func(want int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for runtime.GOMAXPROCS(0) != want {
			if time.Now().After(deadline) {
				t.Fatalf("GOMAXPROCS %d, want %d", runtime.GOMAXPROCS(0), want)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitProcs(1)
	busy.Store(true)
	waitProcs(2)
	busy.Store(false)
	waitProcs(1)
	cancel()
	<-done
	if got := runtime.GOMAXPROCS(0); got != start {
		t.Fatalf("GOMAXPROCS %d after Run, want %d restored", got, start)
	}
}
