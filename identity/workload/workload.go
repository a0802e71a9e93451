// Package workload takes SVIDs and trust bundles from a SPIFFE Workload API
// endpoint (a SPIRE agent's socket) instead of the built-in CA.
//
// A node agent using it attests to the endpoint as one workload and
// receives, on one watch, every X.509 SVID the endpoint gives that workload
// (with SPIRE: one per registration entry whose parent is the node's SPIRE
// agent and whose selectors match the nodemesh agent), indexed by SPIFFE
// ID, and the bundles. Source implements identity.Provider, and with Add
// and Remove (which identities the node's pods run as) the data plane's
// SVIDs interface, so the data path builds the same TLS configs as with the
// built-in CA. Which identities a node gets is SPIRE's decision, and the
// node authorization promise (a compromised node can present only the
// identities registered under it) is SPIRE's to keep. docs/install.md,
// "SPIRE as the identity source", has the design and its limits.
//
// Fail closed: an identity a pod needs but the endpoint does not provide,
// an SVID past its NotAfter, an endpoint that answers "no identity issued"
// (SPIRE's PermissionDenied once the last entry is gone) and an endpoint
// of another trust domain all leave the pod without an SVID, so its
// tunnels fail at the handshake.
package workload

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/svid"
)

// Errors callers branch on.
var (
	// ErrNoSVID is returned (wrapped) when the endpoint gave no valid SVID
	// for an identity.
	ErrNoSVID = errors.New("no valid SVID from the Workload API")
	// ErrTrustDomainMismatch is returned (wrapped) by Run when the endpoint
	// issues SVIDs of another trust domain than the mesh's.
	ErrTrustDomainMismatch = errors.New("the Workload API's trust domain is not the mesh's")
	// ErrSocketMissing is returned (wrapped) by New when the endpoint's
	// unix socket does not exist.
	ErrSocketMissing = errors.New("the Workload API socket does not exist")
)

// Config configures a Source.
type Config struct {
	// Addr is the endpoint, "unix:///run/spire/sockets/agent.sock", or ""
	// for $SPIFFE_ENDPOINT_SOCKET.
	Addr string
	// TrustDomain is the mesh's: SVIDs of any other are refused, and an
	// endpoint that issues them stops Run with ErrTrustDomainMismatch.
	TrustDomain spiffeid.TrustDomain
	Log         *slog.Logger
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Source is an identity.Provider fed by a Workload API watch.
type Source struct {
	client *workloadapi.Client
	addr   string
	td     spiffeid.TrustDomain
	log    *slog.Logger
	now    func() time.Time

	closeOnce sync.Once

	mu      sync.RWMutex
	svids   map[spiffeid.ID]*x509svid.SVID // provided by the endpoint
	owners  map[string]spiffeid.ID         // owner (pod) -> identity it runs as
	wanted  map[spiffeid.ID]int            // identity -> number of owners
	bundles *x509bundle.Set
	lastErr error
	fatal   error              // set once: the watch stops
	stop    context.CancelFunc // cancels Run's watch
	updated chan struct{}      // closed and replaced on each update
}

// New checks cfg and prepares the connection to the Workload API (a unix
// socket must exist already). Call Run to start watching.
func New(ctx context.Context, cfg Config) (*Source, error) {
	if cfg.Log == nil {
		return nil, errors.New("creating Workload API source: no logger")
	}
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("creating Workload API source: no trust domain")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	addr := cfg.Addr
	if addr == "" {
		var ok bool
		if addr, ok = workloadapi.GetDefaultAddress(); !ok {
			return nil, errors.New("creating Workload API source: no address given and SPIFFE_ENDPOINT_SOCKET is not set")
		}
	}
	if err := workloadapi.ValidateAddress(addr); err != nil {
		return nil, fmt.Errorf("creating Workload API source: address %q: %w", addr, err)
	}
	if err := checkSocket(addr); err != nil {
		return nil, err
	}
	c, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		return nil, fmt.Errorf("connecting to the Workload API at %s: %w", addr, err)
	}
	return &Source{client: c, addr: addr, td: cfg.TrustDomain, log: cfg.Log, now: cfg.Now,
		svids: map[spiffeid.ID]*x509svid.SVID{}, owners: map[string]spiffeid.ID{}, wanted: map[spiffeid.ID]int{},
		updated: make(chan struct{})}, nil
}

// checkSocket fails when a unix address names a path that is not a socket,
// so a missing mount is a clear start-up error, not a silent retry loop.
func checkSocket(addr string) error {
	u, err := url.Parse(addr)
	if err != nil || u.Scheme != "unix" {
		return nil // tcp: nothing to look at before dialling
	}
	fi, err := os.Stat(u.Path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: %s (is the SPIRE agent running on this node, and is its socket directory mounted into this pod with a hostPath volume?)", ErrSocketMissing, u.Path)
	}
	if err != nil {
		return fmt.Errorf("checking the Workload API socket %s: %w", u.Path, err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("the Workload API address %s is a %s, not a unix socket", u.Path, fi.Mode().Type())
	}
	return nil
}

// Close closes the connection to the endpoint (Run does on return; call it
// for a Source that never ran). It is safe to call more than once.
func (s *Source) Close() {
	s.closeOnce.Do(func() { _ = s.client.Close() })
}

// Addr is the endpoint's address.
func (s *Source) Addr() string { return s.addr }

// Run watches the endpoint until ctx ends (go-spiffe reconnects with
// backoff meanwhile), then closes the connection. It returns early with
// ErrTrustDomainMismatch if the endpoint issues SVIDs of another trust
// domain.
func (s *Source) Run(ctx context.Context) error {
	defer s.Close()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	s.stop = cancel
	fatal := s.fatal
	s.mu.Unlock()
	if fatal != nil {
		return fatal
	}
	err := s.client.WatchX509Context(wctx, s)
	s.mu.RLock()
	fatal = s.fatal
	s.mu.RUnlock()
	switch {
	case fatal != nil:
		return fatal
	case ctx.Err() != nil:
		return nil
	}
	return fmt.Errorf("watching the Workload API at %s: %w", s.addr, err)
}

// OnX509ContextUpdate implements workloadapi.X509ContextWatcher.
func (s *Source) OnX509ContextUpdate(c *workloadapi.X509Context) {
	svids := make(map[spiffeid.ID]*x509svid.SVID, len(c.SVIDs))
	var foreign []string
	for _, sv := range c.SVIDs {
		if sv.ID.TrustDomain() != s.td {
			foreign = append(foreign, sv.ID.String())
			continue
		}
		if _, dup := svids[sv.ID]; dup {
			s.log.Warn("Workload API sent two SVIDs for one identity; using the first", "spiffe_id", sv.ID.String())
			continue
		}
		svids[sv.ID] = sv
	}
	var fatal error
	switch {
	case len(foreign) > 0:
		fatal = fmt.Errorf("%w: the Workload API at %s issues %s, but the mesh's trust domain (--trust-domain) is %q; give SPIRE's trust_domain and the agents' --trust-domain the same value",
			ErrTrustDomainMismatch, s.addr, foreign[0], s.td.Name())
	case !c.Bundles.Has(s.td):
		fatal = fmt.Errorf("%w: the Workload API at %s sends no bundle for the mesh's trust domain %q (--trust-domain); give SPIRE's trust_domain and the agents' --trust-domain the same value",
			ErrTrustDomainMismatch, s.addr, s.td.Name())
	}
	s.mu.Lock()
	if fatal != nil {
		// Fail closed: nothing from this endpoint is used.
		svids = map[spiffeid.ID]*x509svid.SVID{}
		if s.fatal == nil {
			s.fatal = fatal
		}
		s.lastErr = fatal
		if s.stop != nil {
			s.stop()
		}
	} else {
		s.bundles, s.lastErr = c.Bundles, nil
	}
	s.svids = svids
	close(s.updated)
	s.updated = make(chan struct{})
	s.mu.Unlock()
	if fatal != nil {
		s.log.Error("refusing the Workload API's SVIDs", "err", fatal)
		return
	}
	s.log.Debug("Workload API update", "svids", len(svids), "bundles", c.Bundles.Len())
}

// OnX509ContextWatchError implements workloadapi.X509ContextWatcher. After
// a lost connection the SVIDs held stay in use until they expire (the SPIRE
// agent restarting must not break every tunnel). PermissionDenied is the
// endpoint's answer, not an outage: it has no identity for this caller
// (SPIRE: "no identity issued", no entry matches, or the last one was
// deleted), so every SVID held is dropped.
func (s *Source) OnX509ContextWatchError(err error) {
	if status.Code(err) == codes.Canceled || errors.Is(err, context.Canceled) {
		return // Run is stopping
	}
	denied := status.Code(err) == codes.PermissionDenied
	s.mu.Lock()
	s.lastErr = err
	dropped := 0
	if denied {
		dropped = len(s.svids)
		s.svids = map[spiffeid.ID]*x509svid.SVID{}
		close(s.updated)
		s.updated = make(chan struct{})
	}
	s.mu.Unlock()
	if denied {
		s.log.Warn("the Workload API issues this agent no identity (no registration entry matches it, or the last was deleted); pods on this node get no tunnels until one does",
			"error", err, "dropped_svids", dropped)
		return
	}
	s.log.Warn("Workload API watch failed; keeping the SVIDs held until they expire", "error", err)
}

// WaitUntilUpdated blocks until the endpoint has answered once (an update,
// or its refusal to issue any identity), or ctx ends.
func (s *Source) WaitUntilUpdated(ctx context.Context) error {
	s.mu.RLock()
	ch := s.updated
	have := s.bundles != nil || s.fatal != nil
	s.mu.RUnlock()
	if have {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the Workload API: %w", ctx.Err())
	}
}

// Updated returns a channel closed at the next update.
func (s *Source) Updated() <-chan struct{} {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.updated
}

// Provided returns the identities the endpoint currently provides, sorted.
func (s *Source) Provided() []spiffeid.ID {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]spiffeid.ID, 0, len(s.svids))
	for id := range s.svids {
		out = append(out, id)
	}
	return sortIDs(out)
}

// Add records that owner (a pod) runs as id, so that its SVID may be
// presented. It refuses identities of another trust domain and IDs that are
// not workload IDs; it does not wait for the endpoint.
func (s *Source) Add(owner string, id spiffeid.ID) error {
	if id.TrustDomain() != s.td {
		return fmt.Errorf("adding identity %s for %s: not in trust domain %s", id, owner, s.td)
	}
	if _, err := identity.WorkloadOf(id); err != nil {
		return fmt.Errorf("adding identity for %s: %w", owner, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.owners[owner]; ok {
		if old == id {
			return nil
		}
		s.releaseLocked(old)
	}
	s.owners[owner] = id
	s.wanted[id]++
	return nil
}

// Remove forgets owner; an identity no owner runs as is no longer
// presented, even if the endpoint still provides it.
func (s *Source) Remove(owner string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if id, ok := s.owners[owner]; ok {
		delete(s.owners, owner)
		s.releaseLocked(id)
	}
}

func (s *Source) releaseLocked(id spiffeid.ID) {
	if s.wanted[id]--; s.wanted[id] <= 0 {
		delete(s.wanted, id)
	}
}

// IDs returns the identities the node's pods run as (Add), sorted, whether
// or not the endpoint provides them.
func (s *Source) IDs() []spiffeid.ID {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]spiffeid.ID, 0, len(s.wanted))
	for id := range s.wanted {
		out = append(out, id)
	}
	return sortIDs(out)
}

func sortIDs(ids []spiffeid.ID) []spiffeid.ID {
	slices.SortFunc(ids, func(a, b spiffeid.ID) int { return cmp.Compare(a.String(), b.String()) })
	return ids
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.fatal != nil {
		return nil, s.fatal
	}
	if s.bundles == nil {
		return nil, fmt.Errorf("no bundle for %q: no Workload API update from %s yet (last error: %v)", td, s.addr, s.lastErr)
	}
	return s.bundles.GetX509BundleForTrustDomain(td)
}

// SVIDSource implements identity.Provider: its GetX509SVID fails while no
// pod of the node runs as id (Add), or the endpoint has not provided an
// unexpired SVID for id.
func (s *Source) SVIDSource(id spiffeid.ID) x509svid.Source { return idSource{s, id} }

type idSource struct {
	s  *Source
	id spiffeid.ID
}

func (i idSource) GetX509SVID() (*x509svid.SVID, error) {
	i.s.mu.RLock()
	sv, wanted, lastErr := i.s.svids[i.id], i.s.wanted[i.id] > 0, i.s.lastErr
	i.s.mu.RUnlock()
	if !wanted {
		return nil, fmt.Errorf("%w for %s: no pod with this identity on this node", ErrNoSVID, i.id)
	}
	if sv == nil {
		return nil, fmt.Errorf("%w for %s: the Workload API at %s provides none (no registration entry for this identity under this node's SPIRE agent matches the nodemesh agent, or no update yet; last error: %v)",
			ErrNoSVID, i.id, i.s.addr, lastErr)
	}
	if na := sv.Certificates[0].NotAfter; !i.s.now().Before(na) {
		return nil, fmt.Errorf("%w for %s: it expired at %s and the Workload API sent no newer one (last error: %v)", ErrNoSVID, i.id, na.UTC().Format(time.RFC3339), lastErr)
	}
	return sv, nil
}

// Collector exports the expiry of the SVIDs presented (provided and
// wanted) and of the mesh trust domain's roots, under the built-in CA's
// metric names (svid.ExpiryCollector).
func (s *Source) Collector() prometheus.Collector {
	return svid.ExpiryCollector(func() (map[spiffeid.ID]*x509svid.SVID, []*x509.Certificate) {
		s.mu.RLock()
		defer s.mu.RUnlock()
		held := map[spiffeid.ID]*x509svid.SVID{}
		for id, sv := range s.svids {
			if s.wanted[id] > 0 {
				held[id] = sv
			}
		}
		var roots []*x509.Certificate
		if s.bundles != nil {
			if b, ok := s.bundles.Get(s.td); ok {
				roots = b.X509Authorities()
			}
		}
		return held, roots
	})
}
