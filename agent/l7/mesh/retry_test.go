package mesh

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/l7/retry"
	"github.com/nodemesh/nodemesh/agent/l7/route"
)

// outage sends requests at a fixed rate (an open-loop client, as a fleet
// of callers is) through retryLoop to a backend that answers every attempt
// with 503 after latency, and returns the requests sent and the attempts
// the backend received.
func outage(t *testing.T, budget *retry.Budget, pol *route.RetryPolicy, rate time.Duration, n int, latency time.Duration) (requests, attempts int64) {
	t.Helper()
	var att atomic.Int64
	backend := func() (*http.Response, error) {
		att.Add(1)
		time.Sleep(latency)
		return &http.Response{StatusCode: http.StatusServiceUnavailable, Body: io.NopCloser(strings.NewReader("down"))}, nil
	}
	var wg sync.WaitGroup
	tick := time.NewTicker(rate)
	defer tick.Stop()
	for range n {
		<-tick.C
		wg.Add(1)
		go func() {
			defer wg.Done()
			done := budget.Request()
			defer done()
			resp, err := retryLoop(context.Background(), budget, pol, true, backend)
			if err != nil {
				t.Errorf("retryLoop: %v", err)
				return
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("status %d, want the backend's 503", resp.StatusCode)
			}
		}()
	}
	wg.Wait()
	if r, rt := budget.InFlight(); r != 0 || rt != 0 {
		t.Errorf("budget not returned: %d requests and %d retries still in flight", r, rt)
	}
	return int64(n), att.Load()
}

// TestRetryBudgetOutage proves that retries cannot multiply load when a
// backend fails everything: 400 requests at 500/s to a backend that answers
// every attempt with 503, each request allowed 3 retries. Without a budget
// the backend gets 4 attempts per request; with the default budget (retries
// in flight at most 20% of requests in flight, or 3) it gets at most about
// 1.3. The budget place is held through the retry's attempt, not only its
// backoff: releasing it before the attempt (as the agent once did) lets
// nearly every retry through here, and this test fails.
func TestRetryBudgetOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("timing test (1-2 s)")
	}
	pol := &route.RetryPolicy{Codes: []int{503}, Attempts: 3, Backoff: time.Millisecond}
	const n, latency = 400, 20 * time.Millisecond
	// Control: a budget that never refuses lets every retry through.
	req, att := outage(t, retry.NewBudget(100, 1<<20), pol, 2*time.Millisecond, n, latency)
	t.Logf("no budget: %d requests, %d attempts (%.2f per request)", req, att, float64(att)/float64(req))
	if att != 4*req {
		t.Errorf("without a budget: %d attempts for %d requests, want 4 each", att, req)
	}
	req, att = outage(t, retry.NewBudget(retry.DefaultPercent, retry.DefaultMinConcurrency), pol, 2*time.Millisecond, n, latency)
	ratio := float64(att) / float64(req)
	t.Logf("default budget: %d requests, %d attempts (%.2f per request)", req, att, ratio)
	// Requests in flight here are about 500/s × 20 ms = 10, so the budget
	// is its minimum, 3 retries in flight, each lasting at least 20 ms: at
	// most 150 retries/s against 500 requests/s, 1.3 attempts per request.
	// 1.5 leaves room for a loaded machine's timer overshoot.
	if ratio > 1.5 {
		t.Errorf("with the retry budget the backend got %.2f attempts per request, want at most 1.5", ratio)
	}
	if att == req {
		t.Error("no retry was made at all: the budget's minimum should allow some")
	}
}

// A retry that succeeds returns the success; the budget is returned.
func TestRetryLoopRecovers(t *testing.T) {
	b := retry.NewBudget(retry.DefaultPercent, retry.DefaultMinConcurrency)
	pol := &route.RetryPolicy{Codes: []int{503}, Attempts: 2}
	calls := 0
	done := b.Request()
	resp, err := retryLoop(context.Background(), b, pol, true, func() (*http.Response, error) {
		calls++
		if r, rt := b.InFlight(); calls > 1 && (r != 1 || rt != 1) {
			t.Errorf("during the retry: %d requests, %d retries in flight, want 1 and 1 (the retry holds its place)", r, rt)
		}
		code := http.StatusServiceUnavailable
		if calls == 2 {
			code = http.StatusOK
		}
		return &http.Response{StatusCode: code, Body: http.NoBody}, nil
	})
	done()
	if err != nil || resp.StatusCode != 200 || calls != 2 {
		t.Fatalf("got %v %v after %d calls, want 200 after 2", resp, err, calls)
	}
	if r, rt := b.InFlight(); r != 0 || rt != 0 {
		t.Errorf("after: %d requests, %d retries in flight", r, rt)
	}
}
