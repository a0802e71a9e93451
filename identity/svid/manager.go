// Package svid is the node agent's side of workload identity: a Manager that
// holds one X.509 SVID per workload identity running on the node, fetched
// from the nodemesh CA (Client), renewed at half life with jitter and
// exponential backoff, and handed to TLS through go-spiffe's
// x509svid.Source and x509bundle.Source.
//
// The Manager does not know about pods: its caller says which identities
// are wanted (Add/Remove per owner, e.g. per pod UID; identity/k8s drives it
// from a pod informer). An identity is dropped when its last owner leaves.
package svid

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/nodemesh/nodemesh/identity"
)

// Signer obtains a signed SVID chain for id over the key in csrDER. Client
// implements it against the nodemesh CA.
type Signer interface {
	Sign(ctx context.Context, id spiffeid.ID, csrDER []byte) (*Signed, error)
}

// Signed is a signer's answer.
type Signed struct {
	Chain  []*x509.Certificate // leaf first
	Bundle []*x509.Certificate // trust roots; nil if the signer sends none
}

// Config configures a Manager.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	CA          Signer
	Log         *slog.Logger
	// MaxConcurrent bounds simultaneous CA requests; default 4.
	MaxConcurrent int
	// RefreshFraction of an SVID's lifetime after which it is renewed;
	// default 0.5 (half life). Jitter (fraction of lifetime, default 0.1)
	// moves each renewal earlier by a random amount up to it, so pods
	// started together do not renew together and at least
	// 1-RefreshFraction of the lifetime is always left when renewal starts:
	// that is how long a CA outage cached SVIDs survive.
	RefreshFraction, Jitter float64
	// BackoffMin/BackoffMax bound the exponential retry delay after a
	// failed request; defaults 1s and 30s.
	BackoffMin, BackoffMax time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Manager holds the SVIDs of the workloads on one node. Its methods are safe
// for concurrent use.
type Manager struct {
	cfg Config
	log *slog.Logger
	sem chan struct{}

	mu      sync.RWMutex
	owners  map[string]spiffeid.ID // owner (pod UID) -> identity
	entries map[spiffeid.ID]*entry
	bundle  *x509bundle.Bundle
	runCtx  context.Context // nil until Run
	wg      sync.WaitGroup
	bundleC chan struct{} // closed and replaced on bundle change
}

type entry struct {
	id     spiffeid.ID
	refs   int
	cancel context.CancelFunc
	svid   *x509svid.SVID // nil until first fetch
	ready  chan struct{}  // closed when svid is first set
	err    error          // last fetch error
}

// ErrNoSVID is returned (wrapped) by an SVID source that holds no valid SVID.
var ErrNoSVID = errors.New("no valid SVID")

// NewWithCA returns a Manager that gets SVIDs from the nodemesh CA at
// cc.URL, and the CA client. The client verifies the CA against the
// manager's own trust bundle (load it with SetBundle, e.g. from
// identity/k8s.RunBundleWatcher) unless cc.Bundle is set. cfg.CA is ignored.
func NewWithCA(cfg Config, cc ClientConfig) (*Manager, *Client, error) {
	cfg.CA = placeholder{}
	m, err := New(cfg)
	if err != nil {
		return nil, nil, err
	}
	if cc.Bundle == nil {
		cc.Bundle = m
	}
	c, err := NewClient(cc)
	if err != nil {
		return nil, nil, err
	}
	m.cfg.CA = c
	return m, c, nil
}

type placeholder struct{}

func (placeholder) Sign(context.Context, spiffeid.ID, []byte) (*Signed, error) {
	return nil, errors.New("no CA configured")
}

// New validates cfg and returns a Manager; call Run to start it.
func New(cfg Config) (*Manager, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("creating SVID manager: empty trust domain")
	}
	if cfg.CA == nil {
		return nil, errors.New("creating SVID manager: no CA")
	}
	if cfg.Log == nil {
		return nil, errors.New("creating SVID manager: no logger")
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 4
	}
	if cfg.RefreshFraction == 0 {
		cfg.RefreshFraction = 0.5
	}
	if cfg.Jitter == 0 {
		cfg.Jitter = 0.1
	}
	if cfg.RefreshFraction >= 1 || cfg.Jitter < 0 || cfg.RefreshFraction-cfg.Jitter <= 0 {
		return nil, fmt.Errorf("creating SVID manager: refresh fraction %.2f minus jitter %.2f must stay within (0, 1)", cfg.RefreshFraction, cfg.Jitter)
	}
	if cfg.BackoffMin <= 0 {
		cfg.BackoffMin = time.Second
	}
	if cfg.BackoffMax <= 0 {
		cfg.BackoffMax = 30 * time.Second
	}
	if cfg.BackoffMax < cfg.BackoffMin {
		return nil, fmt.Errorf("creating SVID manager: backoff max %s < min %s", cfg.BackoffMax, cfg.BackoffMin)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Manager{
		cfg:     cfg,
		log:     cfg.Log,
		sem:     make(chan struct{}, cfg.MaxConcurrent),
		owners:  map[string]spiffeid.ID{},
		entries: map[spiffeid.ID]*entry{},
		bundleC: make(chan struct{}),
	}, nil
}

// Run fetches and renews SVIDs until ctx ends, then waits for its workers.
func (m *Manager) Run(ctx context.Context) error {
	m.mu.Lock()
	if m.runCtx != nil {
		m.mu.Unlock()
		return errors.New("SVID manager: Run called twice")
	}
	m.runCtx = ctx
	for _, e := range m.entries {
		m.startLocked(e)
	}
	m.mu.Unlock()
	<-ctx.Done()
	m.wg.Wait()
	return nil
}

// Add records that owner (e.g. a pod UID) runs as id. The first owner of an
// identity starts fetching its SVID. Re-adding an owner with another id
// moves it.
func (m *Manager) Add(owner string, id spiffeid.ID) error {
	if id.TrustDomain() != m.cfg.TrustDomain {
		return fmt.Errorf("adding identity %s for %s: not in trust domain %s", id, owner, m.cfg.TrustDomain)
	}
	if _, err := identity.WorkloadOf(id); err != nil {
		return fmt.Errorf("adding identity for %s: %w", owner, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.owners[owner]; ok {
		if old == id {
			return nil
		}
		m.releaseLocked(old)
	}
	m.owners[owner] = id
	e := m.entries[id]
	if e == nil {
		e = &entry{id: id, ready: make(chan struct{})}
		m.entries[id] = e
		if m.runCtx != nil {
			m.startLocked(e)
		}
		m.log.Debug("identity wanted", "spiffe_id", id.String(), "owner", owner)
	}
	e.refs++
	return nil
}

// Remove forgets owner; when an identity loses its last owner its SVID is
// dropped at once (it can no longer be presented).
func (m *Manager) Remove(owner string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id, ok := m.owners[owner]
	if !ok {
		return
	}
	delete(m.owners, owner)
	m.releaseLocked(id)
}

func (m *Manager) releaseLocked(id spiffeid.ID) {
	e := m.entries[id]
	if e == nil {
		return
	}
	if e.refs--; e.refs > 0 {
		return
	}
	if e.cancel != nil {
		e.cancel()
	}
	delete(m.entries, id)
	m.log.Info("identity dropped: its last pod left the node", "spiffe_id", id.String())
}

// IDs returns the identities currently wanted.
func (m *Manager) IDs() []spiffeid.ID {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]spiffeid.ID, 0, len(m.entries))
	for id := range m.entries {
		out = append(out, id)
	}
	slices.SortFunc(out, func(a, b spiffeid.ID) int {
		if a.String() < b.String() {
			return -1
		}
		if a.String() > b.String() {
			return 1
		}
		return 0
	})
	return out
}

// SetBundle replaces the trust bundle (e.g. from the published ConfigMap).
// Live connections are unaffected; new handshakes use the new bundle.
func (m *Manager) SetBundle(roots []*x509.Certificate) error {
	if len(roots) == 0 {
		return errors.New("setting trust bundle: no roots (refusing to trust nothing and fail every handshake)")
	}
	b := x509bundle.FromX509Authorities(m.cfg.TrustDomain, roots)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.bundle != nil && m.bundle.Equal(b) {
		return nil
	}
	m.bundle = b
	close(m.bundleC)
	m.bundleC = make(chan struct{})
	m.log.Info("trust bundle loaded", "roots", len(roots))
	return nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (m *Manager) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != m.cfg.TrustDomain {
		return nil, fmt.Errorf("no trust bundle for trust domain %q (this mesh is %q)", td, m.cfg.TrustDomain)
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.bundle == nil {
		return nil, fmt.Errorf("no trust bundle for %q loaded yet (is the %s ConfigMap published?)", td, identity.BundleConfigMap)
	}
	return m.bundle, nil
}

// SVIDSource returns the x509svid.Source for id. It fails (handshakes fail
// closed) while no unexpired SVID for id is held.
func (m *Manager) SVIDSource(id spiffeid.ID) x509svid.Source { return idSource{m, id} }

type idSource struct {
	m  *Manager
	id spiffeid.ID
}

func (s idSource) GetX509SVID() (*x509svid.SVID, error) { return s.m.get(s.id) }

func (m *Manager) get(id spiffeid.ID) (*x509svid.SVID, error) {
	m.mu.RLock()
	e := m.entries[id]
	var svid *x509svid.SVID
	var lastErr error
	if e != nil {
		svid, lastErr = e.svid, e.err
	}
	m.mu.RUnlock()
	switch {
	case e == nil:
		return nil, fmt.Errorf("%w for %s: no pod with this identity on this node", ErrNoSVID, id)
	case svid == nil && lastErr != nil:
		return nil, fmt.Errorf("%w for %s yet: %w", ErrNoSVID, id, lastErr)
	case svid == nil:
		return nil, fmt.Errorf("%w for %s yet: request in flight", ErrNoSVID, id)
	}
	if now := m.cfg.Now(); !now.Before(svid.Certificates[0].NotAfter) {
		return nil, fmt.Errorf("%w for %s: it expired at %s and renewal failed (%v); refusing to present it", ErrNoSVID, id, svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339), lastErr)
	}
	return svid, nil
}

// Wait blocks until an SVID for id has been fetched once, or ctx ends.
func (m *Manager) Wait(ctx context.Context, id spiffeid.ID) error {
	m.mu.RLock()
	e := m.entries[id]
	m.mu.RUnlock()
	if e == nil {
		return fmt.Errorf("waiting for SVID of %s: identity not wanted (no Add)", id)
	}
	select {
	case <-e.ready:
		return nil
	case <-ctx.Done():
		_, err := m.get(id)
		return fmt.Errorf("waiting for SVID of %s: %w (last: %v)", id, ctx.Err(), err)
	}
}

func (m *Manager) startLocked(e *entry) {
	ctx, cancel := context.WithCancel(m.runCtx)
	e.cancel = cancel
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.maintain(ctx, e)
	}()
}

// maintain keeps e's SVID fresh until ctx ends.
func (m *Manager) maintain(ctx context.Context, e *entry) {
	backoff := m.cfg.BackoffMin
	for {
		svid, err := m.fetch(ctx, e.id)
		if ctx.Err() != nil {
			return
		}
		var wait time.Duration
		now := m.cfg.Now()
		m.mu.Lock()
		if err != nil {
			e.err = err
			m.mu.Unlock()
			wait = backoff + time.Duration(mrand.Int64N(int64(backoff)/5+1))
			backoff = min(backoff*2, m.cfg.BackoffMax)
			held := "none"
			if e.svid != nil {
				held = "valid until " + e.svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339Nano)
				// Never sleep past expiry on backoff when a retry might still save it.
				if left := e.svid.Certificates[0].NotAfter.Sub(now); left > 0 && wait > left/2 && left/2 > m.cfg.BackoffMin {
					wait = left / 2
				}
			}
			m.log.Warn("SVID request failed; retrying", "spiffe_id", e.id.String(), "error", err, "retry_in", wait, "current_svid", held)
		} else {
			first := e.svid == nil
			e.svid, e.err = svid, nil
			if first {
				close(e.ready)
			}
			m.mu.Unlock()
			backoff = m.cfg.BackoffMin
			leaf := svid.Certificates[0]
			life := leaf.NotAfter.Sub(now)
			frac := m.cfg.RefreshFraction - m.cfg.Jitter*mrand.Float64()
			// Never renew in a tight loop, even if the CA hands out SVIDs
			// that are about to expire (e.g. its own CA certificate is).
			wait = max(time.Duration(float64(life)*frac), m.cfg.BackoffMin)
			m.log.Debug("SVID issued", "spiffe_id", e.id.String(), "expires", leaf.NotAfter, "renew_in", wait)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (m *Manager) fetch(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	select {
	case m.sem <- struct{}{}:
		defer func() { <-m.sem }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating key for %s: %w", id, err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, fmt.Errorf("creating CSR for %s: %w", id, err)
	}
	signed, err := m.cfg.CA.Sign(ctx, id, csr)
	if err != nil {
		return nil, fmt.Errorf("requesting SVID for %s: %w", id, err)
	}
	svid := &x509svid.SVID{ID: id, Certificates: signed.Chain, PrivateKey: key}
	if err := m.check(svid, signed.Bundle); err != nil {
		return nil, fmt.Errorf("checking SVID issued for %s: %w", id, err)
	}
	if len(signed.Bundle) > 0 {
		if err := m.SetBundle(signed.Bundle); err != nil {
			return nil, err
		}
	}
	return svid, nil
}

// check verifies what the CA sent before it is ever presented: the leaf is
// for id, over our key, and chains to the bundle that came with it (or the
// current one).
func (m *Manager) check(svid *x509svid.SVID, roots []*x509.Certificate) error {
	if len(svid.Certificates) == 0 {
		return errors.New("empty certificate chain")
	}
	leaf := svid.Certificates[0]
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(svid.PrivateKey.Public()) {
		return errors.New("certificate is not for the key we generated")
	}
	var src x509bundle.Source = m
	if len(roots) > 0 {
		src = x509bundle.FromX509Authorities(m.cfg.TrustDomain, roots)
	}
	got, _, err := x509svid.Verify(svid.Certificates, src, x509svid.WithTime(m.cfg.Now()))
	if err != nil {
		return err
	}
	if got != svid.ID {
		return fmt.Errorf("certificate is for %s, not %s", got, svid.ID)
	}
	return nil
}
