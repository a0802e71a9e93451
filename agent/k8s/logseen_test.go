package k8s

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// logSeen is a slog handler that counts messages (and passes records on to
// next, if set), so a test can wait for proof that something happened (a
// reload was tried, a watch failed) instead of sleeping and asserting that
// nothing changed, which a slow machine would pass without testing.
type logSeen struct {
	next slog.Handler
	mu   *sync.Mutex
	msgs map[string]int
}

func newLogSeen(next slog.Handler) *logSeen {
	return &logSeen{next: next, mu: &sync.Mutex{}, msgs: map[string]int{}}
}

func (l *logSeen) Enabled(context.Context, slog.Level) bool { return true }

func (l *logSeen) Handle(ctx context.Context, r slog.Record) error {
	l.mu.Lock()
	l.msgs[r.Message]++
	l.mu.Unlock()
	if l.next != nil {
		return l.next.Handle(ctx, r)
	}
	return nil
}

func (l *logSeen) WithAttrs(as []slog.Attr) slog.Handler {
	c := *l
	if l.next != nil {
		c.next = l.next.WithAttrs(as)
	}
	return &c
}

func (l *logSeen) WithGroup(g string) slog.Handler {
	c := *l
	if l.next != nil {
		c.next = l.next.WithGroup(g)
	}
	return &c
}

func (l *logSeen) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.msgs[msg]
}

// waitMore waits until msg was logged more than n times.
func (l *logSeen) waitMore(t *testing.T, msg string, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for l.count(msg) <= n {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for the log message %q", msg)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitAny waits until one of msgs was logged more times than its count in
// base, and returns that message.
func (l *logSeen) waitAny(t *testing.T, base map[string]int) string {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		for msg, n := range base {
			if l.count(msg) > n {
				return msg
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for any of the log messages %v", base)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
