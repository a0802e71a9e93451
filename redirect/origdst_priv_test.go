package redirect

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

// warnCount is a slog handler that counts Warn records.
type warnCount struct {
	mu sync.Mutex
	n  int
}

func (h *warnCount) Enabled(context.Context, slog.Level) bool { return true }
func (h *warnCount) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn && strings.Contains(r.Message, "without an original destination") {
		h.mu.Lock()
		h.n++
		h.mu.Unlock()
	}
	return nil
}
func (h *warnCount) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *warnCount) WithGroup(string) slog.Handler      { return h }

// TestPrivDirectConnectsToTheOutboundListener: an application in an
// enrolled pod can dial the agent's outbound listener (127.0.0.1:15001,
// [::1]:15001) itself, as often as it likes. Each connection is reset (not
// closed, which an application could take for an empty answer) and
// counted; it is logged once, not once per connection (issue 14: a pod
// must not flood the agent's log). Before, each cost a Warn line.
func TestPrivDirectConnectsToTheOutboundListener(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	b := tp.pod("b")
	logs := &warnCount{}
	cfg := tp.config()
	cfg.Logger = slog.New(logs)
	capt := loadCaptureT(t, cfg)
	ep := enrollT(t, capt, b)
	agentServe(t, capt, ep)
	const n = 40
	d := &inpod.Dialer{Netns: b.netns}
	for i := range n {
		addr := "127.0.0.1:15001"
		if i%2 == 1 {
			addr = "[::1]:15001"
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := d.DialContext(ctx, "tcp", addr)
		cancel()
		if err != nil {
			if !strings.Contains(err.Error(), "reset") {
				t.Fatalf("dial %s: %v", addr, err)
			}
			continue
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadAll(c)
		c.Close()
		if err == nil || !strings.Contains(err.Error(), "reset") {
			t.Fatalf("connection %d to %s: %v, want a reset", i, addr, err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for capt.noOrigDst.Load() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := capt.noOrigDst.Load(); got != n {
		t.Fatalf("counted %d connections without an original destination, want %d", got, n)
	}
	logs.mu.Lock()
	defer logs.mu.Unlock()
	if logs.n != 1 {
		t.Fatalf("%d warnings for %d connections, want 1", logs.n, n)
	}
}
