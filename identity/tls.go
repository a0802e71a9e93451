package identity

import (
	"crypto/tls"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Provider hands out the SVIDs of the workloads on this node and the trust
// bundle to verify peers with. The built-in CA's SVID manager
// (identity/svid.Manager) and the Workload API source
// (identity/workload.Source) both implement it.
//
// SVIDSource must return a source whose GetX509SVID fails (so handshakes fail
// closed) while no valid SVID for id is held: never yet fetched, expired, or
// the identity was dropped.
type Provider interface {
	SVIDSource(id spiffeid.ID) x509svid.Source
	x509bundle.Source
}

// ClientConfig returns a TLS 1.3 mTLS client config that presents local's
// SVID and accepts only a server presenting exactly peer.
func ClientConfig(p Provider, local, peer spiffeid.ID) *tls.Config {
	c := tlsconfig.MTLSClientConfig(p.SVIDSource(local), p, tlsconfig.AuthorizeID(peer))
	c.MinVersion = tls.VersionTLS13
	return c
}

// ServerConfig returns a TLS 1.3 mTLS server config that presents local's
// SVID and accepts clients the authorizer allows. A nil authorizer accepts
// any SVID of local's trust domain (policy then decides on the peer ID).
func ServerConfig(p Provider, local spiffeid.ID, authorizer tlsconfig.Authorizer) *tls.Config {
	if authorizer == nil {
		authorizer = tlsconfig.AuthorizeMemberOf(local.TrustDomain())
	}
	c := tlsconfig.MTLSServerConfig(p.SVIDSource(local), p, authorizer)
	c.MinVersion = tls.VersionTLS13
	return c
}

// PeerID returns the SPIFFE ID of the verified peer of a completed handshake.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errNoPeerCert
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}
