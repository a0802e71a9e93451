package proxy_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/proxy"
)

// warnCounter is a slog handler that counts Warn records.
type warnCounter struct {
	mu    sync.Mutex
	warns []string
}

func (h *warnCounter) Enabled(context.Context, slog.Level) bool { return true }
func (h *warnCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		h.mu.Lock()
		h.warns = append(h.warns, r.Message)
		h.mu.Unlock()
	}
	return nil
}
func (h *warnCounter) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *warnCounter) WithGroup(string) slog.Handler      { return h }

func (h *warnCounter) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.warns)
}

// TestRefusalsAnAppCausesAtWillAreNotLoggedEachTime: an enrolled pod's
// application can connect to the agent's in-pod listeners directly
// (127.0.0.1:15001 has no original destination; its own agent ports are a
// capture loop) as often as it likes. Every such connection is reset and
// counted, but it may not cost a log line each: that would let one pod
// flood the agent's log (issue 14: limits are logged once, not per hit).
func TestRefusalsAnAppCausesAtWillAreNotLoggedEachTime(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	for _, tc := range []struct {
		name    string
		origDst proxy.OrigDstFunc
		detail  string
	}{
		{"no original destination", func(net.Conn) (netip.AddrPort, error) {
			return netip.AddrPort{}, errors.New("no original destination recorded")
		}, "no original destination"},
		{"capture loop", func(net.Conn) (netip.AddrPort, error) {
			return netip.MustParseAddrPort("127.0.0.1:15001"), nil
		}, "capture loop"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &warnCounter{}
			obs := &recorder{}
			p, err := proxy.New(proxy.Config{Resolver: proxy.ResolverFunc(f.resolve), Pool: f.pool1, ServerTLS: f.tls,
				Policy: allowAll, Observer: obs, Logger: slog.New(logs), AgentPorts: []uint16{15001, 15006, 15008}})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			ln := listenOn(t, ipA)
			done := make(chan struct{})
			serveErr := make(chan error, 1)
			go func() { defer close(done); serveErr <- p.ServeOutbound(context.Background(), ln, f.a.w, tc.origDst) }()
			select {
			case err := <-serveErr:
				t.Fatalf("serving: %v", err)
			case <-time.After(100 * time.Millisecond):
			}
			const n = 50
			for i := range n {
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					// The reset can arrive before connect returns.
					if !strings.Contains(err.Error(), "reset") {
						t.Fatal(err)
					}
					continue
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadAll(c); err == nil || !strings.Contains(err.Error(), "reset") {
					t.Fatalf("connection %d: %v, want a reset", i, err)
				}
				c.Close()
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				obs.mu.Lock()
				got := len(obs.refused)
				var details []string
				details = append(details, obs.refused...)
				obs.mu.Unlock()
				if got == n {
					for _, d := range details {
						if d != tc.detail {
							t.Fatalf("refusal detail %q, want %q", d, tc.detail)
						}
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d refusals counted, want %d", got, n)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if w := logs.count(); w != 1 {
				t.Fatalf("%d warnings logged for %d refused connections, want exactly 1", w, n)
			}
			p.Close()
			<-done
		})
	}
}
