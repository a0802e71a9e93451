// Package waitfor is the one polling helper of the tree's tests: it waits
// until a condition holds and fails the test, naming what it waited for,
// when the deadline passes first. Unit tests (no root) and lab tests use
// it alike; it imports nothing of this module, so any test can.
//
// Poll for a state the code under test will reach; do not use it to wait
// and then assert that nothing happened.
package waitfor

import (
	"testing"
	"time"
)

// maxInterval bounds the pause between polls: short enough for unit tests,
// long enough not to flood an API server or an agent's admin port.
const maxInterval = 250 * time.Millisecond

// True polls cond until it returns true, for at most d.
func True(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for wait := 5 * time.Millisecond; !cond(); wait = min(2*wait, maxInterval) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(wait)
	}
}

// NoError polls f until it returns nil, for at most d; the failure names
// f's last error.
func NoError(t testing.TB, d time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for wait := 5 * time.Millisecond; ; wait = min(2*wait, maxInterval) {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, d, err)
		}
		time.Sleep(wait)
	}
}
