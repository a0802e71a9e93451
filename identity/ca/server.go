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
	// MaxInFlight bounds concurrent sign requests; default 64. Excess
	// requests get CodeUnavailable at once rather than queueing.
	MaxInFlight int
	// Version is the build version served at identity.VersionPath (for
	// `nodemeshctl version` and `check`).
	Version string
}

// Server is the CA's HTTPS front end.
type Server struct {
	cfg  ServerConfig
	log  *slog.Logger
	sem  chan struct{}
	cert *servingSource
}

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
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 64
	}
	return &Server{
		cfg:  cfg,
		log:  cfg.Log,
		sem:  make(chan struct{}, cfg.MaxInFlight),
		cert: &servingSource{a: cfg.Authority, id: cfg.ServingID, dns: cfg.DNSNames},
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
	hs := &http.Server{
		Handler:           s.Handler(),
		TLSConfig:         s.TLSConfig(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.ServeTLS(ln, "", "") }()
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

func (s *Server) handleSign(w http.ResponseWriter, r *http.Request) {
	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	default:
		writeRefusal(w, refuse(identity.CodeUnavailable, "CA is at its limit of %d concurrent requests; retry with backoff", cap(s.sem)))
		return
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		token = ""
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, identity.MaxRequestBytes))
	if err != nil {
		s.audit(r.Context(), Caller{}, "", refuse(identity.CodeBadRequest, "reading request body (at most %d bytes): %v", identity.MaxRequestBytes, err), r.RemoteAddr)
		writeRefusal(w, refuse(identity.CodeBadRequest, "reading request body (at most %d bytes): %v", identity.MaxRequestBytes, err))
		return
	}
	resp, ref := s.sign(r.Context(), strings.TrimSpace(token), body, r.RemoteAddr)
	if ref != nil {
		writeRefusal(w, ref)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
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
	caller, err := s.cfg.Authn.Authenticate(ctx, token)
	if err != nil {
		ref := asRefusal(err)
		s.audit(ctx, caller, requestedID(body), ref, remote)
		return nil, ref
	}
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
		ref := refuse(identity.CodeNoWorkload, "no running pod with service account %s is scheduled on node %s (the caller's node); an agent gets SVIDs only for its own node's workloads", req.Workload, caller.Node)
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
