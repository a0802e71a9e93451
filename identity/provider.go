package identity

import (
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
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

// SVIDFunc adapts p to the per-workload SVID lookup of the one builder of
// mTLS configs, hbone.SPIFFETLS (SPIFFETLS{SVID: SVIDFunc(p), Bundles: p}).
func SVIDFunc(p Provider) func(spiffeid.ID) (x509svid.Source, error) {
	return func(id spiffeid.ID) (x509svid.Source, error) { return p.SVIDSource(id), nil }
}
