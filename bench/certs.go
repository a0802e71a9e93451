package bench

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// svidFiles are the PEM files a sidecar proxy reads: its SVID with key
// (one file, as HAProxy wants) and the trust bundle.
type svidFiles struct {
	Cert   string // leaf certificate followed by its private key
	Bundle string // root certificate
}

// sidecarCA makes X.509 SVIDs the way the nodemesh CA does (ECDSA P-256,
// a SPIFFE ID as the only URI SAN, one hour, signed directly by the root),
// so the sidecar baseline pays the same certificate and handshake costs.
type sidecarCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	der  []byte
}

func newSidecarCA(trustDomain string) (*sidecarCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the sidecar CA key: %w", err)
	}
	td, err := url.Parse("spiffe://" + trustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain %q: %w", trustDomain, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"nodemesh bench"}, CommonName: "bench root"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("signing the sidecar CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing the sidecar CA: %w", err)
	}
	return &sidecarCA{key: key, cert: cert, der: der}, nil
}

// issue writes an SVID for spiffeID into dir and returns the files.
func (ca *sidecarCA) issue(dir, spiffeID string, serial int64) (svidFiles, error) {
	id, err := url.Parse(spiffeID)
	if err != nil || id.Scheme != "spiffe" {
		return svidFiles{}, fmt.Errorf("SPIFFE ID %q is not a spiffe:// URI", spiffeID)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return svidFiles{}, fmt.Errorf("generating a key for %s: %w", spiffeID, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return svidFiles{}, fmt.Errorf("signing the SVID for %s: %w", spiffeID, err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return svidFiles{}, fmt.Errorf("encoding the key for %s: %w", spiffeID, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return svidFiles{}, fmt.Errorf("creating %s: %w", dir, err)
	}
	f := svidFiles{Cert: filepath.Join(dir, "svid.pem"), Bundle: filepath.Join(dir, "bundle.pem")}
	certPEM := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})...)
	if err := os.WriteFile(f.Cert, certPEM, 0o600); err != nil {
		return svidFiles{}, fmt.Errorf("writing %s: %w", f.Cert, err)
	}
	if err := os.WriteFile(f.Bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.der}), 0o600); err != nil {
		return svidFiles{}, fmt.Errorf("writing %s: %w", f.Bundle, err)
	}
	return f, nil
}
