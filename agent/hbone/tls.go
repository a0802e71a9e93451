package hbone

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ClientTLS provides the TLS configuration for a tunnel from the workload src
// to the workload dst. The returned config must present src's SVID, accept
// only a server whose SVID is exactly dst, and allow only TLS 1.3 with ALPN
// "h2" (the pool checks the last two and refuses otherwise).
type ClientTLS interface {
	ClientTLS(src, dst spiffeid.ID) (*tls.Config, error)
}

// ServerTLS provides the TLS configuration of the HBONE listener of the
// workload local. The config must present local's SVID and require and
// verify a client SVID.
type ServerTLS interface {
	ServerTLS(local spiffeid.ID) (*tls.Config, error)
}

// SPIFFETLS builds HBONE TLS configurations from go-spiffe sources with
// tlsconfig.MTLSClientConfig / MTLSServerConfig. It implements ClientTLS and
// ServerTLS.
type SPIFFETLS struct {
	// SVID returns the SVID source of a local workload (the agent holds one
	// per workload on its node).
	SVID func(id spiffeid.ID) (x509svid.Source, error)
	// Bundles verifies peers' chains. Only trust domains it has a bundle for
	// can authenticate.
	Bundles x509bundle.Source
	// PeerTrustDomains are the trust domains whose workloads may open
	// tunnels to a local workload. Empty means only the local workload's own
	// trust domain.
	PeerTrustDomains []spiffeid.TrustDomain
}

var errNoSVIDSource = errors.New("SPIFFETLS.SVID is nil")

// ClientTLS implements ClientTLS.
func (s SPIFFETLS) ClientTLS(src, dst spiffeid.ID) (*tls.Config, error) {
	if dst.IsZero() {
		return nil, errors.New("building HBONE client TLS config: destination SPIFFE ID is empty; refusing to tunnel to an unauthenticated peer")
	}
	svid, err := s.svid(src)
	if err != nil {
		return nil, err
	}
	cfg := tlsconfig.MTLSClientConfig(svid, s.Bundles, tlsconfig.AuthorizeID(dst))
	harden(cfg)
	return cfg, nil
}

// ServerTLS implements ServerTLS.
func (s SPIFFETLS) ServerTLS(local spiffeid.ID) (*tls.Config, error) {
	svid, err := s.svid(local)
	if err != nil {
		return nil, err
	}
	tds := s.PeerTrustDomains
	if len(tds) == 0 {
		tds = []spiffeid.TrustDomain{local.TrustDomain()}
	}
	authz := func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		for _, td := range tds {
			if id.MemberOf(td) {
				return nil
			}
		}
		return fmt.Errorf("peer %q is not in an accepted trust domain %v", id, tds)
	}
	cfg := tlsconfig.MTLSServerConfig(svid, s.Bundles, authz)
	harden(cfg)
	return cfg, nil
}

func (s SPIFFETLS) svid(id spiffeid.ID) (x509svid.Source, error) {
	if id.IsZero() {
		return nil, errors.New("building HBONE TLS config: local SPIFFE ID is empty")
	}
	if s.SVID == nil {
		return nil, errNoSVIDSource
	}
	src, err := s.SVID(id)
	if err != nil {
		return nil, fmt.Errorf("getting SVID source for %s: %w", id, err)
	}
	return src, nil
}

// harden pins TLS 1.3 and ALPN h2.
func harden(cfg *tls.Config) {
	cfg.MinVersion = tls.VersionTLS13
	cfg.MaxVersion = tls.VersionTLS13
	cfg.NextProtos = []string{ALPN}
}

// PeerID returns the SPIFFE ID of the verified peer of a finished handshake.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("reading peer SPIFFE ID: %w", err)
	}
	return id, nil
}

// checkConnState enforces what the tls.Config asked for, so that a
// misbuilt config from a ClientTLS/ServerTLS implementation cannot weaken a
// tunnel.
func checkConnState(cs tls.ConnectionState) error {
	if cs.Version != tls.VersionTLS13 {
		return fmt.Errorf("negotiated TLS version %#x, HBONE requires TLS 1.3", cs.Version)
	}
	if cs.NegotiatedProtocol != ALPN {
		return fmt.Errorf("negotiated ALPN %q, HBONE requires %q", cs.NegotiatedProtocol, ALPN)
	}
	// go-spiffe verifies the chain and runs the authorizer in
	// VerifyPeerCertificate; a missing peer certificate would mean the
	// config did not require one.
	if len(cs.PeerCertificates) == 0 {
		return errors.New("peer presented no certificate")
	}
	return nil
}
