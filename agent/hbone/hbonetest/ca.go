// Package hbonetest provides test doubles for HBONE: a throwaway SPIFFE
// certificate authority issuing real ECDSA P-256 X.509 SVIDs, so that tunnel
// tests run real mutual TLS without the identity service.
package hbonetest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net/url"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// CA is a self-signed SPIFFE CA for one trust domain.
type CA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  crypto.Signer

	mu     sync.Mutex
	serial int64
}

// NewCA creates a CA for the trust domain td ("cluster.local").
func NewCA(td string) (*CA, error) {
	trust, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return nil, fmt.Errorf("parsing trust domain: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"nodemesh test"}, CommonName: "test CA " + td},
		URIs:                  []*url.URL{trust.ID().URL()},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("creating CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing CA certificate: %w", err)
	}
	return &CA{td: trust, cert: cert, key: key, serial: 1}, nil
}

// Bundle returns the CA's trust bundle; it implements x509bundle.Source.
func (ca *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
}

// TrustDomain returns the CA's trust domain.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// ID returns spiffe://<td>/ns/<ns>/sa/<sa>.
func (ca *CA) ID(ns, sa string) spiffeid.ID {
	id, err := spiffeid.FromSegments(ca.td, "ns", ns, "sa", sa)
	if err != nil {
		panic(fmt.Sprintf("hbonetest: bad ns/sa %q/%q: %v", ns, sa, err))
	}
	return id
}

// SVID issues an X.509 SVID for id, valid for an hour. *x509svid.SVID
// implements x509svid.Source.
func (ca *CA) SVID(id spiffeid.ID) (*x509svid.SVID, error) {
	return ca.SVIDUntil(id, time.Now().Add(time.Hour))
}

// SVIDUntil issues an X.509 SVID for id that expires at notAfter (X.509
// keeps whole seconds: it is truncated to the second), for tests of what
// happens at expiry.
func (ca *CA) SVIDUntil(id spiffeid.ID, notAfter time.Time) (*x509svid.SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating SVID key: %w", err)
	}
	ca.mu.Lock()
	ca.serial++
	serial := ca.serial
	ca.mu.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		URIs:         []*url.URL{id.URL()},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return nil, fmt.Errorf("signing SVID for %s: %w", id, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing SVID: %w", err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}, nil
}

// Store is an in-memory set of SVIDs by ID, usable as hbone.SPIFFETLS.SVID.
type Store struct {
	mu    sync.Mutex
	svids map[spiffeid.ID]*x509svid.SVID
}

// Add stores svid under its ID.
func (s *Store) Add(svid *x509svid.SVID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.svids == nil {
		s.svids = make(map[spiffeid.ID]*x509svid.SVID)
	}
	s.svids[svid.ID] = svid
}

// Source returns the SVID source for id.
func (s *Store) Source(id spiffeid.ID) (x509svid.Source, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	svid, ok := s.svids[id]
	if !ok {
		return nil, fmt.Errorf("no SVID for %s on this node", id)
	}
	return svid, nil
}
