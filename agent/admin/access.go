package admin

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics (15020) and readiness (15021) listen on every node address,
// because the kubelet and a hostNetwork scraper reach them there, and so
// every pod can reach them too. They answer only:
//
//   - callers on the node itself: loopback, or a remote address equal to
//     the local one (a connection between two addresses of the same host
//     takes the destination as its source: the kubelet, hostNetwork pods);
//   - for metrics, callers that Config.MetricsAllow accepts (the agent
//     passes the pods of the service accounts named by --metrics-scrapers).
//
// Everyone else gets 403: the metrics name workloads and principals of the
// node, and readiness says why the node's mesh is not ready.

// sameHost reports whether the request comes from the node itself.
func sameHost(r *http.Request) (remote netip.Addr, ok bool) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}, false
	}
	remote = ap.Addr().Unmap()
	if remote.IsLoopback() {
		return remote, true
	}
	la, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if la == nil {
		return remote, false
	}
	lap, err := netip.ParseAddrPort(la.String())
	if err != nil {
		return remote, false
	}
	return remote, lap.Addr().Unmap() == remote
}

// accessGuard wraps the metrics and readiness handlers.
type accessGuard struct {
	log     *slog.Logger
	refused *prometheus.CounterVec

	mu   sync.Mutex
	last map[string]time.Time // listener -> last log line
}

func newAccessGuard(log *slog.Logger, reg prometheus.Registerer) (*accessGuard, error) {
	g := &accessGuard{log: log, last: map[string]time.Time{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodemesh_admin_requests_refused_total",
			Help: "Requests to the metrics or readiness port refused because they came from outside the node (and, for metrics, from no allowed scraper).",
		}, []string{"listener"})}
	if reg != nil {
		if err := reg.Register(g.refused); err != nil {
			return nil, fmt.Errorf("registering admin metrics: %w", err)
		}
	}
	return g, nil
}

// wrap serves h to same-host callers and to those allow accepts (nil:
// nobody else).
func (g *accessGuard) wrap(listener string, h http.Handler, allow func(netip.Addr) bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		remote, ok := sameHost(r)
		if ok || (allow != nil && remote.IsValid() && allow(remote)) {
			h.ServeHTTP(w, r)
			return
		}
		g.refused.WithLabelValues(listener).Inc()
		g.logOnce(r.Context(), listener, r.RemoteAddr)
		http.Error(w, fmt.Sprintf("the nodemesh agent's %s port answers only the node itself%s (docs/security.md)", listener, allowHint(listener)), http.StatusForbidden)
	})
}

func allowHint(listener string) string {
	if listener == "metrics" {
		return " and the scrapers named by --metrics-scrapers"
	}
	return ""
}

// logOnce logs a refusal at most once a minute per listener.
func (g *accessGuard) logOnce(ctx context.Context, listener, remote string) {
	g.mu.Lock()
	now := time.Now()
	due := now.Sub(g.last[listener]) >= time.Minute
	if due {
		g.last[listener] = now
	}
	g.mu.Unlock()
	if due {
		g.log.LogAttrs(ctx, slog.LevelWarn, "refused a request from outside the node",
			slog.String("listener", listener), slog.String("src", remote))
	}
}
