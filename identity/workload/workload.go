// Package workload takes SVIDs and trust bundles from a SPIFFE Workload API
// endpoint (for example a SPIRE agent's socket) instead of the built-in CA.
//
// A node agent using it receives, on one watch, every X.509 SVID the
// endpoint gives it (SPIRE: the entries whose selectors match the agent),
// indexed by SPIFFE ID, and the bundles. Source implements
// identity.Provider, so the data path builds the same TLS configs as with
// the built-in CA. Which identities exist is the endpoint's decision; the
// node authorization promise is then SPIRE's to keep.
package workload

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// ErrNoSVID is returned (wrapped) when the endpoint gave no valid SVID for
// an identity.
var ErrNoSVID = errors.New("no valid SVID from the Workload API")

// Source is an identity.Provider fed by a Workload API watch.
type Source struct {
	client *workloadapi.Client
	log    *slog.Logger
	now    func() time.Time

	mu      sync.RWMutex
	svids   map[spiffeid.ID]*x509svid.SVID
	bundles *x509bundle.Set
	lastErr error
	updated chan struct{} // closed and replaced on each update
}

// New connects to the Workload API at addr ("unix:///run/spire/sockets/agent.sock",
// or "" for $SPIFFE_ENDPOINT_SOCKET). Call Run to start watching.
func New(ctx context.Context, addr string, log *slog.Logger) (*Source, error) {
	if log == nil {
		return nil, errors.New("creating Workload API source: no logger")
	}
	var opts []workloadapi.ClientOption
	if addr != "" {
		if err := workloadapi.ValidateAddress(addr); err != nil {
			return nil, fmt.Errorf("creating Workload API source: address %q: %w", addr, err)
		}
		opts = append(opts, workloadapi.WithAddr(addr))
	} else if _, ok := workloadapi.GetDefaultAddress(); !ok {
		return nil, errors.New("creating Workload API source: no address given and SPIFFE_ENDPOINT_SOCKET is not set")
	}
	c, err := workloadapi.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to the Workload API: %w", err)
	}
	return &Source{client: c, log: log, now: time.Now, svids: map[spiffeid.ID]*x509svid.SVID{}, updated: make(chan struct{})}, nil
}

// Run watches the endpoint until ctx ends (go-spiffe reconnects with
// backoff meanwhile), then closes the connection.
func (s *Source) Run(ctx context.Context) error {
	defer s.client.Close()
	err := s.client.WatchX509Context(ctx, s)
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("watching the Workload API: %w", err)
}

// OnX509ContextUpdate implements workloadapi.X509ContextWatcher.
func (s *Source) OnX509ContextUpdate(c *workloadapi.X509Context) {
	svids := make(map[spiffeid.ID]*x509svid.SVID, len(c.SVIDs))
	for _, sv := range c.SVIDs {
		if _, dup := svids[sv.ID]; dup {
			s.log.Warn("Workload API sent two SVIDs for one identity; using the first", "spiffe_id", sv.ID.String())
			continue
		}
		svids[sv.ID] = sv
	}
	s.mu.Lock()
	s.svids, s.bundles, s.lastErr = svids, c.Bundles, nil
	close(s.updated)
	s.updated = make(chan struct{})
	s.mu.Unlock()
	s.log.Debug("Workload API update", "svids", len(svids), "bundles", c.Bundles.Len())
}

// OnX509ContextWatchError implements workloadapi.X509ContextWatcher. The
// SVIDs held stay in use until they expire.
func (s *Source) OnX509ContextWatchError(err error) {
	s.mu.Lock()
	s.lastErr = err
	s.mu.Unlock()
	s.log.Warn("Workload API watch failed; keeping the SVIDs held until they expire", "error", err)
}

// WaitUntilUpdated blocks until the next update (or the first, if none yet).
func (s *Source) WaitUntilUpdated(ctx context.Context) error {
	s.mu.RLock()
	ch := s.updated
	have := s.bundles != nil
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

// IDs returns the identities the endpoint currently provides.
func (s *Source) IDs() []spiffeid.ID {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]spiffeid.ID, 0, len(s.svids))
	for id := range s.svids {
		out = append(out, id)
	}
	return out
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.bundles == nil {
		return nil, fmt.Errorf("no bundle for %q: no Workload API update yet (last error: %v)", td, s.lastErr)
	}
	return s.bundles.GetX509BundleForTrustDomain(td)
}

// SVIDSource implements identity.Provider: its GetX509SVID fails while the
// endpoint has not provided an unexpired SVID for id.
func (s *Source) SVIDSource(id spiffeid.ID) x509svid.Source { return idSource{s, id} }

type idSource struct {
	s  *Source
	id spiffeid.ID
}

func (i idSource) GetX509SVID() (*x509svid.SVID, error) {
	i.s.mu.RLock()
	sv, lastErr := i.s.svids[i.id], i.s.lastErr
	i.s.mu.RUnlock()
	if sv == nil {
		return nil, fmt.Errorf("%w for %s (not registered for this agent, or no update yet; last error: %v)", ErrNoSVID, i.id, lastErr)
	}
	if na := sv.Certificates[0].NotAfter; !i.s.now().Before(na) {
		return nil, fmt.Errorf("%w for %s: it expired at %s (last error: %v)", ErrNoSVID, i.id, na.UTC().Format(time.RFC3339), lastErr)
	}
	return sv, nil
}
