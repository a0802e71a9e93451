package svid

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/nodemesh/nodemesh/identity"
)

// TokenFunc returns the bearer token for the next CA request.
type TokenFunc func(ctx context.Context) (string, error)

// FileToken reads the token from path on every call: the kubelet rewrites
// projected tokens before they expire, so a cached copy would go stale.
func FileToken(path string) TokenFunc {
	return func(context.Context) (string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("reading CA token (projected service-account token, audience %s): %w", identity.Audience, err)
		}
		t := strings.TrimSpace(string(b))
		if t == "" {
			return "", fmt.Errorf("CA token file %s is empty", path)
		}
		return t, nil
	}
}

// ClientConfig configures a Client.
type ClientConfig struct {
	// URL of the CA, e.g. https://nodemesh-ca.nodemesh-system.svc:15012.
	URL string
	// CAID is the SPIFFE ID the CA's serving certificate must carry.
	CAID spiffeid.ID
	// Bundle verifies the CA's serving certificate (usually the Manager,
	// fed from the published ConfigMap).
	Bundle x509bundle.Source
	Token  TokenFunc
	// Timeout per request; default 15s.
	Timeout time.Duration
}

// Client talks to the nodemesh CA over TLS 1.3, authenticating the CA by
// its SPIFFE ID against the trust bundle.
type Client struct {
	url   string
	token TokenFunc
	http  *http.Client
}

// NewClient validates cfg.
func NewClient(cfg ClientConfig) (*Client, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("creating CA client: CA URL %q must be https://host:port", cfg.URL)
	}
	if cfg.CAID.IsZero() || cfg.Bundle == nil || cfg.Token == nil {
		return nil, errors.New("creating CA client: CA SPIFFE ID, trust bundle source and token source are all required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 15 * time.Second
	}
	tc := tlsconfig.TLSClientConfig(cfg.Bundle, tlsconfig.AuthorizeID(cfg.CAID))
	tc.MinVersion = tls.VersionTLS13
	tr := &http.Transport{
		TLSClientConfig:     tc,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
	}
	return &Client{
		url:   strings.TrimSuffix(cfg.URL, "/") + identity.SignPath,
		token: cfg.Token,
		http:  &http.Client{Transport: tr, Timeout: cfg.Timeout},
	}, nil
}

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Sign implements Signer. A refusal is returned as *identity.RefusedError.
func (c *Client) Sign(ctx context.Context, id spiffeid.ID, csrDER []byte) (*Signed, error) {
	tok, err := c.token(ctx)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(identity.SignRequest{SPIFFEID: id.String(), CSR: csrDER})
	if err != nil {
		return nil, fmt.Errorf("encoding sign request: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("building sign request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("calling CA at %s: %w", c.url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("reading CA response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var er identity.ErrorResponse
		if json.Unmarshal(data, &er) != nil || er.Code == "" {
			return nil, &identity.RefusedError{Code: identity.CodeInternal, HTTPStatus: resp.StatusCode, Message: fmt.Sprintf("unexpected response: %.200q", data)}
		}
		return nil, &identity.RefusedError{Code: er.Code, Message: er.Message, HTTPStatus: resp.StatusCode}
	}
	var sr identity.SignResponse
	if err := json.Unmarshal(data, &sr); err != nil {
		return nil, fmt.Errorf("decoding CA response: %w", err)
	}
	out := &Signed{}
	if out.Chain, err = parseDERs(sr.Chain); err != nil || len(out.Chain) == 0 {
		return nil, fmt.Errorf("CA response chain: %w", errors.Join(err, errIf(len(out.Chain) == 0, "empty")))
	}
	if out.Bundle, err = parseDERs(sr.Bundle); err != nil {
		return nil, fmt.Errorf("CA response bundle: %w", err)
	}
	return out, nil
}

func parseDERs(ders [][]byte) ([]*x509.Certificate, error) {
	out := make([]*x509.Certificate, 0, len(ders))
	for i, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", i, err)
		}
		out = append(out, c)
	}
	return out, nil
}

func errIf(cond bool, msg string) error {
	if cond {
		return errors.New(msg)
	}
	return nil
}
