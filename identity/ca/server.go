package ca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/nodemesh/nodemesh/identity"
)

// ServerConfig configures a Server.
type ServerConfig struct {
	Authority *Authority
	Authn     Authenticator
	Pods      PodFinder
	Log       *slog.Logger
	// ServingID is the CA's own SPIFFE ID, in its serving certificate;
	// agents accept only a CA presenting it.
	ServingID spiffeid.ID
	// DNSNames go into the serving certificate too (for curl and friends).
	DNSNames []string
	// Metrics receives the CA's counters; nil: private, unregistered ones.
	Metrics *Metrics

	// Limits (docs/security.md). Zero values take the defaults. Every pod
	// can reach the CA, so nothing an unauthenticated caller sends may hold
	// a slot that agents need: a request is read in full and authenticated
	// before it takes one of MaxInFlight, and a caller (a source address)
	// holds at most MaxConnsPerCaller connections and MaxPerCaller requests.
	//
	// MaxInFlight bounds authenticated sign decisions (pod check and
	// signing) at once; default 64. Excess requests get CodeUnavailable at
	// once rather than queueing.
	MaxInFlight int
	// Version is the build version served at identity.VersionPath (for
	// `nodemeshctl version` and `check`).
	Version string
	// MaxRequests and MaxPerCaller bound requests at once, from headers to
	// response, in total and per caller; defaults 512 and 64 (per-pod
	// agents on one node share its address). With bodies of at most
	// identity.MaxRequestBytes they bound body memory (512 × 64 KiB).
	MaxRequests, MaxPerCaller int
	// MaxConns and MaxConnsPerCaller bound open connections (and so TLS
	// handshakes) in total and per caller; defaults 1024 and 128. Excess
	// connections are closed as soon as they are accepted.
	MaxConns, MaxConnsPerCaller int
	// HeaderTimeout bounds the TLS handshake and the request headers;
	// BodyTimeout the body once the headers are in. Defaults 5s each.
	HeaderTimeout, BodyTimeout time.Duration
	// AuthFailureBurst failed authentications per caller are allowed at
	// once, refilled at AuthFailureRate per second; beyond that the
	// caller's requests are refused unread until the budget refills.
	// Defaults 20 and 1.
	AuthFailureBurst int
	AuthFailureRate  float64
}

// Server is the CA's HTTPS front end.
type Server struct {
	cfg      ServerConfig
	log      *slog.Logger
	sem      chan struct{}
	cert     *servingSource
	metrics  *Metrics
	limitLog *limitLog
	requests counts    // per-caller requests in progress
	failed   *failures // per-caller authentication failures
}

// maxHeaderBytes bounds request headers: an agent sends a bearer token of
// about 1 KiB and a few short headers.
const maxHeaderBytes = 16 << 10

// NewServer validates cfg.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Authority == nil || cfg.Authn == nil || cfg.Pods == nil {
		return nil, errors.New("creating CA server: authority, authenticator and pod finder are all required")
	}
	if cfg.Log == nil {
		return nil, errors.New("creating CA server: no logger")
	}
	if cfg.ServingID.IsZero() {
		return nil, errors.New("creating CA server: no serving SPIFFE ID")
	}
	if cfg.ServingID.TrustDomain() != cfg.Authority.TrustDomain() {
		return nil, fmt.Errorf("creating CA server: serving ID %s is outside trust domain %s", cfg.ServingID, cfg.Authority.TrustDomain())
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&cfg.MaxInFlight, 64)
	def(&cfg.MaxRequests, 512)
	def(&cfg.MaxPerCaller, 64)
	def(&cfg.MaxConns, 1024)
	def(&cfg.MaxConnsPerCaller, 128)
	def(&cfg.AuthFailureBurst, 20)
	if cfg.AuthFailureRate <= 0 {
		cfg.AuthFailureRate = 1
	}
	if cfg.HeaderTimeout <= 0 {
		cfg.HeaderTimeout = 5 * time.Second
	}
	if cfg.BodyTimeout <= 0 {
		cfg.BodyTimeout = 5 * time.Second
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	failed, err := newFailures(cfg.AuthFailureRate, cfg.AuthFailureBurst, 4096)
	if err != nil {
		return nil, err
	}
	return &Server{
		cfg:      cfg,
		log:      cfg.Log,
		sem:      make(chan struct{}, cfg.MaxInFlight),
		cert:     &servingSource{a: cfg.Authority, id: cfg.ServingID, dns: cfg.DNSNames},
		metrics:  cfg.Metrics,
		limitLog: newLimitLog(cfg.Log, time.Minute),
		failed:   failed,
	}, nil
}

// Handler returns the CA's HTTP routes.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+identity.SignPath, s.handleSign)
	mux.HandleFunc("GET "+identity.BundlePath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-pem-file")
		_, _ = w.Write(EncodeCerts(s.cfg.Authority.Bundle()))
	})
	mux.HandleFunc("GET "+identity.HealthPath, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET "+identity.VersionPath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"version": s.cfg.Version})
	})
	return mux
}

// TLSConfig is the serving config: TLS 1.3, a certificate for ServingID
// from the active signer, re-issued at half life and after each signer
// change, so agents verify it with the published bundle.
func (s *Server) TLSConfig() *tls.Config {
	c := tlsconfig.TLSServerConfig(s.cert)
	c.MinVersion = tls.VersionTLS13
	return c
}

// Serve serves HTTPS on ln until ctx ends, then shuts down gracefully
// (in-flight requests get up to 10 s).
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	ll := &limitListener{Listener: ln, perCaller: s.cfg.MaxConnsPerCaller, total: s.cfg.MaxConns,
		onLimit: func(limit, remote string) {
			s.limitHit(ctx, limit, remote, fmt.Sprintf("connection closed at accept (at most %d per caller, %d in total)", s.cfg.MaxConnsPerCaller, s.cfg.MaxConns))
		}}
	hs := &http.Server{
		Handler:   s.Handler(),
		TLSConfig: s.TLSConfig(),
		// net/http bounds the TLS handshake by the smallest of these
		// timeouts, so HeaderTimeout bounds it too.
		ReadHeaderTimeout: s.cfg.HeaderTimeout,
		ReadTimeout:       s.cfg.HeaderTimeout + s.cfg.BodyTimeout,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    maxHeaderBytes,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: min(s.cfg.MaxPerCaller, 16),
			// A stream carries at most one request body of MaxRequestBytes.
			MaxReceiveBufferPerStream:     identity.MaxRequestBytes,
			MaxReceiveBufferPerConnection: 2 * identity.MaxRequestBytes,
			CountError: func(string) {
				s.metrics.limits.WithLabelValues(LimitHTTP2Violations).Inc()
			},
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.ServeTLS(ll, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving CA API: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := hs.Shutdown(sctx)
	<-errc
	if err != nil {
		return fmt.Errorf("shutting down CA API: %w", err)
	}
	return nil
}

// handleSign admits a request in this order, so that what an
// unauthenticated caller can hold is bounded per caller and never
// includes an in-flight slot: the caller's failure and request budgets;
// the whole body, within BodyTimeout and MaxRequestBytes; the token; then
// an in-flight slot for the pod check and signing.
func (s *Server) handleSign(w http.ResponseWriter, r *http.Request) {
	ctx, remote := r.Context(), r.RemoteAddr
	caller := callerOf(remote)
	// Refusals before the body is read close an HTTP/1 connection:
	// otherwise net/http would wait for the unread body to discard it.
	if s.failed.exhausted(caller) {
		closeHTTP1(w, r)
		s.refuse(ctx, w, Caller{}, nil, limited(LimitAuthFailures, "too many failed authentications from %s; retry later with a valid token", caller), remote)
		return
	}
	switch s.requests.acquire(caller, s.cfg.MaxPerCaller, s.cfg.MaxRequests, LimitPerCaller, LimitRequests) {
	case LimitPerCaller:
		closeHTTP1(w, r)
		s.refuse(ctx, w, Caller{}, nil, limited(LimitPerCaller, "%s has %d requests in progress, the most one caller may have; retry with backoff", caller, s.cfg.MaxPerCaller), remote)
		return
	case LimitRequests:
		closeHTTP1(w, r)
		s.refuse(ctx, w, Caller{}, nil, limited(LimitRequests, "CA has %d requests in progress, its limit; retry with backoff", s.cfg.MaxRequests), remote)
		return
	}
	defer s.requests.release(caller)

	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		token = ""
	}
	body, ref := s.readBody(w, r)
	if ref != nil {
		closeHTTP1(w, r)
		s.refuse(ctx, w, Caller{}, nil, ref, remote)
		return
	}
	c, ref := s.authenticate(ctx, strings.TrimSpace(token), remote)
	if ref != nil {
		s.refuse(ctx, w, c, body, ref, remote)
		return
	}
	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	default:
		s.refuse(ctx, w, c, body, limited(LimitInFlight, "CA is at its limit of %d concurrent requests; retry with backoff", cap(s.sem)), remote)
		return
	}
	resp, ref := s.decide(ctx, c, body, remote)
	if ref != nil {
		writeRefusal(w, ref)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

// closeHTTP1 makes net/http close an HTTP/1 connection after the answer
// instead of waiting for a body the handler did not read. (On HTTP/2 the
// stream is reset; the connection and its other streams stay.)
func closeHTTP1(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 {
		w.Header().Set("Connection", "close")
	}
}

// limited is the refusal of a request that hit a limit: the CA is not
// deciding now, so agents retry with backoff.
func limited(limit, format string, args ...any) *Refusal {
	ref := refuse(identity.CodeUnavailable, format, args...)
	ref.Limit = limit
	return ref
}

// refuse answers a refused request. A refusal caused by a limit is
// counted and logged by limitHit (rate-limited) rather than audited line
// by line: under attack that would be one log line per attacking request.
func (s *Server) refuse(ctx context.Context, w http.ResponseWriter, c Caller, body []byte, ref *Refusal, remote string) {
	if ref.Limit != "" {
		s.limitHit(ctx, ref.Limit, remote, ref.Msg)
		s.metrics.requests.WithLabelValues(string(ref.Code)).Inc()
	} else {
		s.audit(ctx, c, requestedID(body), ref, remote)
	}
	writeRefusal(w, ref)
}

// readBody reads the request body within BodyTimeout and MaxRequestBytes.
func (s *Server) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *Refusal) {
	if r.ContentLength > identity.MaxRequestBytes {
		ref := refuse(identity.CodeBadRequest, "request body is %d bytes, more than %d", r.ContentLength, identity.MaxRequestBytes)
		ref.Limit = LimitBodySize
		return nil, ref
	}
	s.metrics.reading.Inc()
	defer s.metrics.reading.Dec()
	rc := http.NewResponseController(w)
	// The body deadline is what frees a caller's budget from a client that
	// sends headers and then trickles or stalls (the slow-body attack).
	_ = rc.SetReadDeadline(time.Now().Add(s.cfg.BodyTimeout))
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, identity.MaxRequestBytes))
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		ref := refuse(identity.CodeBadRequest, "request body is more than %d bytes", identity.MaxRequestBytes)
		ref.Limit = LimitBodySize
		return nil, ref
	case errors.Is(err, os.ErrDeadlineExceeded):
		ref := refuse(identity.CodeBadRequest, "request body not received within %s", s.cfg.BodyTimeout)
		ref.Limit = LimitBodyTimeout
		return nil, ref
	case err != nil:
		return nil, refuse(identity.CodeBadRequest, "reading request body (at most %d bytes): %v", identity.MaxRequestBytes, err)
	}
	_ = rc.SetReadDeadline(time.Time{})
	return body, nil
}

// authenticate checks the token. A refusal that says the token is bad
// spends the caller's failure budget; CodeUnavailable (the CA's own
// trouble, or a limit) does not.
func (s *Server) authenticate(ctx context.Context, token, remote string) (Caller, *Refusal) {
	c, err := s.cfg.Authn.Authenticate(ctx, token)
	if err == nil {
		return c, nil
	}
	ref := asRefusal(err)
	if ref.Code != identity.CodeUnavailable && remote != "" {
		s.failed.record(callerOf(remote))
	}
	return c, ref
}
func writeRefusal(w http.ResponseWriter, ref *Refusal) {
	w.Header().Set("Content-Type", "application/json")
	if ref.Code == identity.CodeUnavailable {
		w.Header().Set("Retry-After", "5")
	}
	w.WriteHeader(HTTPStatus(ref.Code))
	_ = json.NewEncoder(w).Encode(identity.ErrorResponse{Code: ref.Code, Message: ref.Msg})
}

// Sign runs the whole decision for one request: authenticate the token,
// parse and check the request, check that a running pod of the requested
// service account is on the caller's node, sign. Every outcome is written
// to the audit log.
func (s *Server) Sign(ctx context.Context, token string, body []byte) (*identity.SignResponse, *Refusal) {
	return s.sign(ctx, token, body, "")
}

func (s *Server) sign(ctx context.Context, token string, body []byte, remote string) (*identity.SignResponse, *Refusal) {
	caller, ref := s.authenticate(ctx, token, remote)
	if ref != nil {
		if ref.Limit != "" {
			s.limitHit(ctx, ref.Limit, remote, ref.Msg)
		}
		s.audit(ctx, caller, requestedID(body), ref, remote)
		return nil, ref
	}
	return s.decide(ctx, caller, body, remote)
}

// decide runs everything after authentication: parse and check the
// request, check the pods on the caller's node, sign.
func (s *Server) decide(ctx context.Context, caller Caller, body []byte, remote string) (*identity.SignResponse, *Refusal) {
	req, ref := ParseSignRequest(body, s.cfg.Authority.TrustDomain())
	if ref != nil {
		s.audit(ctx, caller, requestedID(body), ref, remote)
		return nil, ref
	}
	pod, err := s.cfg.Pods.RunningPod(ctx, caller.Node, req.Workload)
	if err != nil {
		ref := &Refusal{Code: identity.CodeUnavailable, Msg: fmt.Sprintf("cannot check pods of %s on node %s now; retry later", req.Workload, caller.Node), Err: err}
		s.audit(ctx, caller, req.ID.String(), ref, remote)
		return nil, ref
	}
	if pod == "" {
		ref := refuse(identity.CodeNoWorkload, "no running or starting pod with service account %s is scheduled on node %s (the caller's node); an agent gets SVIDs only for its own node's workloads", req.Workload, caller.Node)
		s.audit(ctx, caller, req.ID.String(), ref, remote)
		return nil, ref
	}
	iss, err := s.cfg.Authority.Sign(req.ID, req.CSR.PublicKey)
	if err != nil {
		ref := &Refusal{Code: identity.CodeInternal, Msg: "signing failed", Err: err}
		s.audit(ctx, caller, req.ID.String(), ref, remote)
		return nil, ref
	}
	resp := &identity.SignResponse{ExpiresAt: iss.Chain[0].NotAfter}
	for _, c := range iss.Chain {
		resp.Chain = append(resp.Chain, c.Raw)
	}
	for _, c := range iss.Bundle {
		resp.Bundle = append(resp.Bundle, c.Raw)
	}
	s.metrics.requests.WithLabelValues("issued").Inc()
	s.log.LogAttrs(ctx, slog.LevelInfo, "audit",
		slog.String("decision", "issued"),
		slog.String("caller", caller.User),
		slog.String("node", caller.Node),
		slog.String("agent_pod", caller.Pod),
		slog.String("spiffe_id", req.ID.String()),
		slog.String("pod", req.Workload.Namespace+"/"+pod),
		slog.String("serial", iss.Chain[0].SerialNumber.Text(16)),
		slog.Time("expires", iss.Chain[0].NotAfter),
		slog.String("remote", remote))
	return resp, nil
}

func (s *Server) audit(ctx context.Context, c Caller, id string, ref *Refusal, remote string) {
	s.metrics.requests.WithLabelValues(string(ref.Code)).Inc()
	attrs := []slog.Attr{
		slog.String("decision", "refused"),
		slog.String("caller", c.User),
		slog.String("node", c.Node),
		slog.String("agent_pod", c.Pod),
		slog.String("spiffe_id", id),
		slog.String("reason", string(ref.Code)),
		slog.String("detail", ref.Msg),
		slog.String("remote", remote),
	}
	if ref.Err != nil {
		attrs = append(attrs, slog.String("error", ref.Err.Error()))
	}
	s.log.LogAttrs(ctx, slog.LevelWarn, "audit", attrs...)
}

func asRefusal(err error) *Refusal {
	var ref *Refusal
	if errors.As(err, &ref) {
		return ref
	}
	return &Refusal{Code: identity.CodeUnavailable, Msg: "authentication failed; retry later", Err: err}
}

// requestedID pulls the requested ID out of a body for the audit log, even
// when the body is otherwise invalid.
func requestedID(body []byte) string {
	var req struct {
		ID string `json:"spiffe_id"`
	}
	if json.Unmarshal(body, &req) != nil {
		return ""
	}
	if len(req.ID) > 256 {
		return req.ID[:256] + "..."
	}
	return req.ID
}

// servingSource is the CA's serving certificate as an x509svid.Source.
type servingSource struct {
	a   *Authority
	id  spiffeid.ID
	dns []string

	mu      sync.Mutex
	svid    *x509svid.SVID
	renewAt time.Time
	changed <-chan struct{}
}

func (s *servingSource) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.a.now()
	stale := s.svid == nil || now.After(s.renewAt)
	if s.changed != nil {
		select {
		case <-s.changed:
			stale = true
		default:
		}
	}
	if !stale {
		return s.svid, nil
	}
	changed := s.a.Changed()
	svid, err := s.a.ServingSVID(s.id, s.dns)
	if err != nil {
		if s.svid != nil && now.Before(s.svid.Certificates[0].NotAfter) {
			return s.svid, nil
		}
		return nil, err
	}
	leaf := svid.Certificates[0]
	s.svid, s.changed = svid, changed
	s.renewAt = now.Add(leaf.NotAfter.Sub(now) / 2)
	return svid, nil
}

// EncodeCerts PEM-encodes certificates.
func EncodeCerts(certs []*x509.Certificate) []byte {
	var b strings.Builder
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return []byte(b.String())
}
