// Package retry keeps retries from multiplying load: a Budget per
// destination Service caps the retries in flight at a share of the
// requests in flight (Envoy's retry budget), and Backoff spaces attempts.
//
// A budget counts concurrency, not rates, so it needs no clock and reacts
// at once: when a destination fails every request, the retries already in
// flight use up the budget, and further failures are answered without a
// retry instead of doubling or tripling the load on it.
package retry

import (
	"math"
	"sync"
	"time"
)

// Defaults, as Envoy's: retries in flight may be 20% of the requests in
// flight, and at least 3 are always allowed so that a quiet Service can
// still retry.
const (
	DefaultPercent        = 20
	DefaultMinConcurrency = 3
)

// Budget limits the retries in flight to one destination. The zero value
// is not usable; call NewBudget. It is safe for concurrent use.
type Budget struct {
	percent float64
	min     int

	mu       sync.Mutex
	requests int // in flight, including their retries' original requests
	retries  int // retries in flight
}

// NewBudget returns a budget that allows retries in flight up to percent
// of the requests in flight, or minConcurrency, whichever is larger.
// percent < 0 or minConcurrency < 0 count as 0.
func NewBudget(percent float64, minConcurrency int) *Budget {
	return &Budget{percent: max(percent, 0), min: max(minConcurrency, 0)}
}

// Request records a request in flight; call the returned func exactly
// once when it is over (all attempts done).
func (b *Budget) Request() (done func()) {
	b.Begin()
	var once sync.Once
	return func() { once.Do(b.End) }
}

// Begin records a request in flight, as Request does, without a func to
// allocate: the caller must call End exactly once when it is over.
func (b *Budget) Begin() {
	b.mu.Lock()
	b.requests++
	b.mu.Unlock()
}

// End records the end of a request that Begin recorded.
func (b *Budget) End() {
	b.mu.Lock()
	b.requests--
	b.mu.Unlock()
}

// Retry asks for one retry. ok is false when the budget is spent: do not
// retry, answer with what the last attempt returned. When ok, call done
// exactly once when the retry attempt is over.
func (b *Budget) Retry() (done func(), ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.retries >= b.limitLocked() {
		return nil, false
	}
	b.retries++
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			b.retries--
			b.mu.Unlock()
		})
	}, true
}

func (b *Budget) limitLocked() int {
	return max(b.min, int(math.Floor(float64(b.requests)*b.percent/100)))
}

// InFlight returns the requests and retries in flight, for metrics and tests.
func (b *Budget) InFlight() (requests, retries int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.requests, b.retries
}

// Budgets holds one Budget per destination (a Service's namespace/name),
// created on first use with the same parameters. Budgets of destinations
// with nothing in flight are dropped by Sweep, so the map does not grow
// with Services that are gone.
type Budgets struct {
	percent float64
	min     int
	mu      sync.Mutex
	m       map[string]*Budget
}

// NewBudgets returns an empty set of budgets (see NewBudget).
func NewBudgets(percent float64, minConcurrency int) *Budgets {
	return &Budgets{percent: percent, min: minConcurrency, m: map[string]*Budget{}}
}

// For returns the budget of a destination.
func (bs *Budgets) For(dst string) *Budget {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	b := bs.m[dst]
	if b == nil {
		b = NewBudget(bs.percent, bs.min)
		bs.m[dst] = b
	}
	return b
}

// Sweep drops the budgets that have nothing in flight. A caller holding
// such a budget keeps a working one; only sharing with later callers ends.
func (bs *Budgets) Sweep() {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	for k, b := range bs.m {
		if r, t := b.InFlight(); r == 0 && t == 0 {
			delete(bs.m, k)
		}
	}
}

// Len returns the number of budgets held.
func (bs *Budgets) Len() int {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	return len(bs.m)
}

// Backoff returns the wait before retry number attempt (1 for the first
// retry): base doubled per attempt, capped at 10×base, plus a jitter of up
// to half of that drawn with int64n (math/rand/v2's Int64N). It is never
// less than base, as the Gateway API requires. base <= 0 means no wait.
func Backoff(base time.Duration, attempt int, int64n func(n int64) int64) time.Duration {
	if base <= 0 {
		return 0
	}
	d := base
	for i := 1; i < attempt && d < 10*base; i++ {
		d *= 2
	}
	d = min(d, 10*base)
	if j := int64(d / 2); j > 0 {
		d += time.Duration(int64n(j))
	}
	return d
}
