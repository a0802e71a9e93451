package load

import (
	"testing"
	"time"
)

const ms = time.Millisecond

func TestScheduleSpreadsConnections(t *testing.T) {
	// 1000/s over 4 connections: each sends every 4 ms, phases 0,1,2,3 ms,
	// so the union is one request per millisecond.
	seen := map[time.Duration]int{}
	for c := 0; c < 4; c++ {
		s, ok := NewSchedule(1000, 4, c)
		if !ok {
			t.Fatal("schedule refused")
		}
		if s.Interval != 4*ms {
			t.Fatalf("interval %v, want 4ms", s.Interval)
		}
		for i := 0; i < 5; i++ {
			seen[s.Due(i)]++
		}
	}
	for d := time.Duration(0); d < 20*ms; d += ms {
		if seen[d] != 1 {
			t.Errorf("%v due %d times, want once", d, seen[d])
		}
	}
}

func TestScheduleRefusesNonsense(t *testing.T) {
	for _, tc := range []struct {
		rate float64
		n, c int
	}{{0, 1, 0}, {-5, 1, 0}, {1000, 0, 0}, {1000, 2, 2}, {1000, 2, -1}, {1e12, 1, 0}} {
		if _, ok := NewSchedule(tc.rate, tc.n, tc.c); ok {
			t.Errorf("NewSchedule(%v, %d, %d) accepted", tc.rate, tc.n, tc.c)
		}
	}
}

func TestCorrector(t *testing.T) {
	type req struct{ due, sent, done, want time.Duration }
	for name, reqs := range map[string][]req{
		"on time": {
			{0, 0, 200 * time.Microsecond, 200 * time.Microsecond},
			{ms, ms, ms + 300*time.Microsecond, 300 * time.Microsecond},
		},
		// The generator woke 1 ms late every time; the system was fast.
		// Nothing of the lateness is charged.
		"generator late": {
			{0, ms, ms + 100*time.Microsecond, 100 * time.Microsecond},
			{ms, 2 * ms, 2*ms + 100*time.Microsecond, 100 * time.Microsecond},
			{2 * ms, 3*ms + 500*time.Microsecond, 3*ms + 600*time.Microsecond, 100 * time.Microsecond},
		},
		// The system stalled request 0 for 5 ms; requests 1..3, due every
		// millisecond, queued behind it and are charged the wait.
		"system stall": {
			{0, 0, 5 * ms, 5 * ms},
			{ms, 5 * ms, 5*ms + 100*time.Microsecond, 4*ms + 100*time.Microsecond},
			{2 * ms, 5*ms + 100*time.Microsecond, 5*ms + 200*time.Microsecond, 3*ms + 200*time.Microsecond},
			{3 * ms, 5*ms + 200*time.Microsecond, 5*ms + 300*time.Microsecond, 2*ms + 300*time.Microsecond},
			// Caught up: back to the plain service time.
			{10 * ms, 10 * ms, 10*ms + 100*time.Microsecond, 100 * time.Microsecond},
		},
		// Generator lateness and a stall together: only the stall counts.
		"late and stall": {
			{0, ms, 4 * ms, 3 * ms},
			{ms, 4 * ms, 4*ms + 100*time.Microsecond, 2*ms + 100*time.Microsecond},
		},
		"clock step backwards": {
			{0, 5 * ms, 4 * ms, 0},
		},
	} {
		var c Corrector
		for i, r := range reqs {
			if got := c.Charge(r.due, r.sent, r.done); got != r.want {
				t.Errorf("%s: request %d charged %v, want %v", name, i, got, r.want)
			}
		}
	}
}
