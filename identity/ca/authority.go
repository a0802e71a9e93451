package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Signer is one CA key and the certificates that link it to a trust anchor.
type Signer struct {
	// Cert is the certificate of Key; it signs SVIDs.
	Cert *x509.Certificate
	Key  crypto.Signer
	// Intermediates chain Cert up to Root (excluding both), nearest first.
	Intermediates []*x509.Certificate
	// Root is the trust anchor; Root == Cert for a self-signed root.
	Root *x509.Certificate
}

// chain returns what is sent after the leaf: Cert and intermediates, but
// never the root (peers take roots from the bundle, not from the wire).
func (s *Signer) chain() []*x509.Certificate {
	if s.Cert.Equal(s.Root) {
		return nil
	}
	return append([]*x509.Certificate{s.Cert}, s.Intermediates...)
}

// NewRootSigner generates a self-signed ECDSA P-256 root for td valid for ttl.
func NewRootSigner(td spiffeid.TrustDomain, ttl time.Duration, now time.Time) (*Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating root key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"nodemesh"}, CommonName: "nodemesh root " + now.UTC().Format(time.RFC3339)},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(ttl),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("self-signing root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing generated root: %w", err)
	}
	return &Signer{Cert: cert, Key: key, Root: cert}, nil
}

// Validate checks that the signer can sign: a CA certificate whose public
// key matches Key, that chains to Root, and that is valid at now.
func (s *Signer) Validate(now time.Time) error {
	if s == nil || s.Cert == nil || s.Key == nil || s.Root == nil {
		return errors.New("incomplete CA signer: need certificate, key and root")
	}
	if !s.Cert.IsCA || s.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return fmt.Errorf("CA certificate %q is not a CA (basicConstraints CA:TRUE and keyUsage certSign are required)", s.Cert.Subject)
	}
	pub, ok := s.Key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(s.Cert.PublicKey) {
		return fmt.Errorf("CA key does not match the public key of certificate %q", s.Cert.Subject)
	}
	if now.After(s.Cert.NotAfter) || now.Before(s.Cert.NotBefore) {
		return fmt.Errorf("CA certificate %q is valid only from %s to %s", s.Cert.Subject, s.Cert.NotBefore.UTC(), s.Cert.NotAfter.UTC())
	}
	roots := x509.NewCertPool()
	roots.AddCert(s.Root)
	inter := x509.NewCertPool()
	for _, c := range s.Intermediates {
		inter.AddCert(c)
	}
	if _, err := s.Cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("CA certificate %q does not chain to root %q: %w", s.Cert.Subject, s.Root.Subject, err)
	}
	return nil
}

// AuthorityConfig configures an Authority.
type AuthorityConfig struct {
	TrustDomain spiffeid.TrustDomain
	// Signer signs SVIDs. Its Root is trusted.
	Signer *Signer
	// ExtraRoots are trusted in addition to Signer.Root (e.g. a retiring
	// root after a restart during rotation).
	ExtraRoots []*x509.Certificate
	// TTL of issued SVIDs; default 1h.
	TTL time.Duration
	// Backdate moves NotBefore into the past to absorb clock skew; default 5m.
	Backdate time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Authority signs SVIDs and owns the trust bundle. It is safe for
// concurrent use.
type Authority struct {
	td       spiffeid.TrustDomain
	ttl      time.Duration
	backdate time.Duration
	now      func() time.Time

	mu      sync.RWMutex
	signer  *Signer
	roots   []*x509.Certificate
	watches []chan struct{}
}

// NewAuthority validates cfg and returns an Authority.
func NewAuthority(cfg AuthorityConfig) (*Authority, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("creating CA: empty trust domain")
	}
	if cfg.TTL == 0 {
		cfg.TTL = time.Hour
	}
	if cfg.TTL < time.Second {
		return nil, fmt.Errorf("creating CA: SVID TTL %s is shorter than a second", cfg.TTL)
	}
	if cfg.Backdate == 0 {
		cfg.Backdate = 5 * time.Minute
	}
	if cfg.Backdate < 0 {
		return nil, fmt.Errorf("creating CA: negative backdate %s", cfg.Backdate)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if err := cfg.Signer.Validate(cfg.Now()); err != nil {
		return nil, fmt.Errorf("creating CA: %w", err)
	}
	a := &Authority{td: cfg.TrustDomain, ttl: cfg.TTL, backdate: cfg.Backdate, now: cfg.Now, signer: cfg.Signer}
	a.roots = appendRoot(nil, cfg.Signer.Root)
	for _, r := range cfg.ExtraRoots {
		a.roots = appendRoot(a.roots, r)
	}
	return a, nil
}

func appendRoot(roots []*x509.Certificate, r *x509.Certificate) []*x509.Certificate {
	if slices.ContainsFunc(roots, r.Equal) {
		return roots
	}
	return append(slices.Clip(roots), r)
}

// TrustDomain returns the CA's trust domain.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// TTL returns the lifetime of issued SVIDs.
func (a *Authority) TTL() time.Duration { return a.ttl }

// Bundle returns the trusted roots. The slice must not be modified.
func (a *Authority) Bundle() []*x509.Certificate {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.roots
}

// ActiveSigner returns the signer in use.
func (a *Authority) ActiveSigner() *Signer {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.signer
}

// Changed returns a channel closed at the next change of signer or bundle.
func (a *Authority) Changed() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	ch := make(chan struct{})
	a.watches = append(a.watches, ch)
	return ch
}

func (a *Authority) notifyLocked() {
	for _, ch := range a.watches {
		close(ch)
	}
	a.watches = nil
}

// TrustRoot adds r to the bundle (rotation phase 1).
func (a *Authority) TrustRoot(r *x509.Certificate) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.roots = appendRoot(a.roots, r)
	a.notifyLocked()
}

// Activate makes s the signer (rotation phase 2). Its root must already be
// trusted so that no SVID is ever issued that peers cannot verify.
func (a *Authority) Activate(s *Signer) error {
	if err := s.Validate(a.now()); err != nil {
		return fmt.Errorf("activating CA signer: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !slices.ContainsFunc(a.roots, s.Root.Equal) {
		return fmt.Errorf("activating CA signer: root %q is not in the trust bundle yet; trust it first and let agents load it", s.Root.Subject)
	}
	a.signer = s
	a.notifyLocked()
	return nil
}

// RetireRoot removes r from the bundle (rotation phase 3). The active
// signer's root cannot be retired.
func (a *Authority) RetireRoot(r *x509.Certificate) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.signer.Root.Equal(r) {
		return fmt.Errorf("retiring root %q: it is the active signer's root", r.Subject)
	}
	a.roots = slices.DeleteFunc(slices.Clone(a.roots), r.Equal)
	a.notifyLocked()
	return nil
}

// Issued is a signed SVID with the bundle that verifies it.
type Issued struct {
	Chain  []*x509.Certificate // leaf first, no root
	Bundle []*x509.Certificate
}

// Sign issues an SVID for id over pub. The certificate's only SAN is id's
// URI; nothing from a CSR other than its public key is copied. NotAfter is
// capped at the signing certificate's NotAfter.
func (a *Authority) Sign(id spiffeid.ID, pub crypto.PublicKey, dnsNames ...string) (*Issued, error) {
	if id.TrustDomain() != a.td {
		return nil, fmt.Errorf("signing SVID for %s: trust domain is not %s", id, a.td)
	}
	a.mu.RLock()
	s, roots := a.signer, a.roots
	a.mu.RUnlock()
	now := a.now()
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(a.ttl)
	if notAfter.After(s.Cert.NotAfter) {
		notAfter = s.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"nodemesh"}},
		NotBefore:             now.Add(-a.backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              dnsNames,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.Cert, pub, s.Key)
	if err != nil {
		return nil, fmt.Errorf("signing SVID for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing SVID just signed for %s: %w", id, err)
	}
	return &Issued{Chain: append([]*x509.Certificate{leaf}, s.chain()...), Bundle: roots}, nil
}

// ServingSVID issues the CA's own TLS certificate: identity id (agents
// authorize the CA by it) plus DNS names for other clients.
func (a *Authority) ServingSVID(id spiffeid.ID, dnsNames []string) (*x509svid.SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating serving key: %w", err)
	}
	iss, err := a.Sign(id, key.Public(), dnsNames...)
	if err != nil {
		return nil, fmt.Errorf("issuing CA serving certificate: %w", err)
	}
	return &x509svid.SVID{ID: id, Certificates: iss.Chain, PrivateKey: key}, nil
}

func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}
