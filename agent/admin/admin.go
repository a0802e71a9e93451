// Package admin serves the agent's node-local operator interfaces:
//
//   - admin (127.0.0.1:15000): /config_dump (workloads, services, SVIDs,
//     pools, capture status, L7 routes: sections registered by components),
//     /connections, /status, /logging (get and set the log level), and
//     /debug/pprof;
//   - readiness (:15021): /healthz/ready, 200 only when every registered
//     check passes (state synced, SVIDs present, capture verified);
//   - metrics (:15020): Prometheus /metrics (also /stats/prometheus, Istio's
//     path), with Istio-compatible TCP metrics (see Metrics).
//
// Components plug in through small function types (DumpFunc, CheckFunc), so
// this package imports none of them.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Default addresses, the same ports as Istio's.
const (
	DefaultAdminAddr     = "127.0.0.1:15000"
	DefaultMetricsAddr   = ":15020"
	DefaultReadinessAddr = ":15021"
)

// DumpFunc returns one section of the config dump; the value is encoded as
// JSON. It is called on every request, so it should read current state.
type DumpFunc func() any

// CheckFunc is a readiness check: nil when the component is ready, else an
// error saying what is missing ("2 of 3 SVIDs missing").
type CheckFunc func(ctx context.Context) error

// Config configures a Server.
type Config struct {
	// Addresses; "" disables that listener (tests use the handlers).
	AdminAddr, MetricsAddr, ReadinessAddr string
	Logger                                *slog.Logger
	// Level is the agent's log level, changed by POST /logging.
	Level *slog.LevelVar
	// Gatherer serves /metrics; nil serves prometheus.DefaultGatherer.
	Gatherer prometheus.Gatherer
	// Info is shown by /status (node name, version, ...).
	Info map[string]string
	// CheckTimeout bounds each readiness check (default 2 s).
	CheckTimeout time.Duration
	// MetricsAllow, if set, admits metrics scrapes from remote addresses
	// outside the node (access.go); nil: only the node itself.
	MetricsAllow func(netip.Addr) bool
	// Registerer receives the admin server's own counters; nil: none.
	Registerer prometheus.Registerer
}

// Server is the admin, metrics and readiness HTTP servers.
type Server struct {
	cfg   Config
	log   *slog.Logger
	start time.Time

	mu     sync.Mutex
	dumps  map[string]DumpFunc
	checks map[string]CheckFunc
	conns  DumpFunc
	extra  map[string]http.Handler // by exact path
	guard  *accessGuard
}

// New returns a Server; register sections and checks, then Run it.
func New(cfg Config) (*Server, error) {
	if cfg.Level == nil {
		return nil, errors.New("creating admin server: Config.Level is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Gatherer == nil {
		cfg.Gatherer = prometheus.DefaultGatherer
	}
	if cfg.CheckTimeout <= 0 {
		cfg.CheckTimeout = 2 * time.Second
	}
	guard, err := newAccessGuard(cfg.Logger, cfg.Registerer)
	if err != nil {
		return nil, err
	}
	return &Server{cfg: cfg, log: cfg.Logger, start: time.Now(), guard: guard,
		dumps: make(map[string]DumpFunc), checks: make(map[string]CheckFunc), extra: make(map[string]http.Handler)}, nil
}

// AddDump registers a config dump section. Registering a name twice
// replaces the section.
func (s *Server) AddDump(name string, fn DumpFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dumps[name] = fn
}

// Handle serves h at the exact admin path (for example the policy
// engine's /policy/explain). It may be called while the server runs.
func (s *Server) Handle(path string, h http.Handler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.extra[path] = h
}

// SetConnections registers the source of /connections.
func (s *Server) SetConnections(fn DumpFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns = fn
}

// AddReadiness registers a readiness check. The agent is ready only when
// every registered check passes, and never with none registered.
func (s *Server) AddReadiness(name string, fn CheckFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.checks[name] = fn
}

// CheckResult is one readiness check's outcome.
type CheckResult struct {
	Name  string `json:"name"`
	Ready bool   `json:"ready"`
	Error string `json:"error,omitempty"`
}

// Ready runs every readiness check.
func (s *Server) Ready(ctx context.Context) (bool, []CheckResult) {
	s.mu.Lock()
	names := make([]string, 0, len(s.checks))
	for n := range s.checks {
		names = append(names, n)
	}
	checks := make(map[string]CheckFunc, len(s.checks))
	for n, c := range s.checks {
		checks[n] = c
	}
	s.mu.Unlock()
	slices.Sort(names)
	ready := len(names) > 0
	out := make([]CheckResult, 0, len(names))
	for _, n := range names {
		cctx, cancel := context.WithTimeout(ctx, s.cfg.CheckTimeout)
		err := checks[n](cctx)
		cancel()
		r := CheckResult{Name: n, Ready: err == nil}
		if err != nil {
			r.Error = err.Error()
			ready = false
		}
		out = append(out, r)
	}
	return ready, out
}

// AdminHandler serves the admin API.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", s.handleDump)
	mux.HandleFunc("GET /config_dump/{section}", s.handleDump)
	mux.HandleFunc("GET /connections", s.handleConnections)
	mux.HandleFunc("GET /status", s.handleStatus)
	mux.HandleFunc("GET /logging", s.handleLogging)
	mux.HandleFunc("POST /logging", s.handleLogging)
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, "nodemesh agent admin\n\n/config_dump[/<section>]\n/connections\n/status\n/logging[?level=debug|info|warn|error] (POST to set)\n/debug/pprof/\n")
		s.mu.Lock()
		for p := range s.extra {
			fmt.Fprintln(w, p)
		}
		s.mu.Unlock()
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		h := s.extra[r.URL.Path]
		s.mu.Unlock()
		if h == nil {
			http.NotFound(w, r)
			return
		}
		h.ServeHTTP(w, r)
	})
	return mux
}

// MetricsHandler serves Prometheus metrics to the node itself and to
// the scrapers Config.MetricsAllow admits.
func (s *Server) MetricsHandler() http.Handler {
	h := promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn), MaxRequestsInFlight: 8})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", h)
	mux.Handle("GET /stats/prometheus", h)
	return s.guard.wrap("metrics", mux, s.cfg.MetricsAllow)
}

// ReadinessHandler serves /healthz/ready to the node itself (the kubelet).
func (s *Server) ReadinessHandler() http.Handler {
	return s.guard.wrap("readiness", s.readinessMux(), nil)
}

func (s *Server) readinessMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		ready, results := s.Ready(r.Context())
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !ready {
			w.WriteHeader(http.StatusServiceUnavailable)
			if len(results) == 0 {
				fmt.Fprintln(w, "not ready: no readiness checks registered yet")
			}
		}
		for _, c := range results {
			if c.Ready {
				fmt.Fprintf(w, "%s: ready\n", c.Name)
			} else {
				fmt.Fprintf(w, "%s: not ready: %s\n", c.Name, c.Error)
			}
		}
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (s *Server) handleDump(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	dumps := make(map[string]DumpFunc, len(s.dumps))
	for n, d := range s.dumps {
		dumps[n] = d
	}
	s.mu.Unlock()
	if sec := r.PathValue("section"); sec != "" {
		d, ok := dumps[sec]
		if !ok {
			names := make([]string, 0, len(dumps))
			for n := range dumps {
				names = append(names, n)
			}
			slices.Sort(names)
			http.Error(w, fmt.Sprintf("no config dump section %q; sections: %s", sec, strings.Join(names, ", ")), http.StatusNotFound)
			return
		}
		writeJSON(w, d())
		return
	}
	out := make(map[string]any, len(dumps))
	for n, d := range dumps {
		out[n] = d()
	}
	writeJSON(w, out)
}

func (s *Server) handleConnections(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	fn := s.conns
	s.mu.Unlock()
	if fn == nil {
		writeJSON(w, []any{})
		return
	}
	writeJSON(w, fn())
}

// Status is the /status answer.
type Status struct {
	Ready         bool              `json:"ready"`
	Checks        []CheckResult     `json:"checks"`
	Info          map[string]string `json:"info,omitempty"`
	UptimeSeconds int64             `json:"uptimeSeconds"`
	LogLevel      string            `json:"logLevel"`
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	ready, checks := s.Ready(r.Context())
	writeJSON(w, Status{Ready: ready, Checks: checks, Info: s.cfg.Info,
		UptimeSeconds: int64(time.Since(s.start).Seconds()), LogLevel: levelName(s.cfg.Level.Level())})
}

func levelName(l slog.Level) string { return strings.ToLower(l.String()) }

// ParseLevel parses debug, info, warn or error (any case).
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "debug", "info", "warn", "warning", "error":
	default:
		return 0, fmt.Errorf("unknown log level %q (want debug, info, warn or error)", s)
	}
	if strings.EqualFold(strings.TrimSpace(s), "warning") {
		s = "warn"
	}
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("parsing log level %q: %w", s, err)
	}
	return l, nil
}

func (s *Server) handleLogging(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		q := r.URL.Query().Get("level")
		l, err := ParseLevel(q)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		old := s.cfg.Level.Level()
		s.cfg.Level.Set(l)
		s.log.Info("log level changed through the admin API", "from", levelName(old), "to", levelName(l))
	}
	writeJSON(w, map[string]string{"level": levelName(s.cfg.Level.Level())})
}

// Run listens on the configured addresses and serves until ctx ends, then
// shuts the servers down. Listening errors are returned at once.
func (s *Server) Run(ctx context.Context) error {
	type srv struct {
		name, addr string
		h          http.Handler
	}
	var lns []net.Listener
	var servers []*http.Server
	closeAll := func() {
		for _, ln := range lns {
			ln.Close()
		}
	}
	for _, x := range []srv{
		{"admin", s.cfg.AdminAddr, s.AdminHandler()},
		{"metrics", s.cfg.MetricsAddr, s.MetricsHandler()},
		{"readiness", s.cfg.ReadinessAddr, s.ReadinessHandler()},
	} {
		if x.addr == "" {
			continue
		}
		var lc net.ListenConfig
		ln, err := lc.Listen(ctx, "tcp", x.addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("listening for %s on %s: %w", x.name, x.addr, err)
		}
		lns = append(lns, ln)
		servers = append(servers, &http.Server{Handler: x.h, ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute,
			MaxHeaderBytes: 16 << 10, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)})
		s.log.Info("serving", "what", x.name, "addr", ln.Addr().String())
	}
	errc := make(chan error, len(servers))
	var wg sync.WaitGroup
	for i, hs := range servers {
		wg.Go(func() {
			if err := hs.Serve(lns[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		})
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, hs := range servers {
		_ = hs.Shutdown(sctx)
	}
	wg.Wait()
	return err
}
