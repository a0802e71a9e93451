package ca

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"time"
)

// RotationConfig paces a root rotation.
type RotationConfig struct {
	// Propagation is how long the new root is trusted (published) before
	// anything is signed with it, so every agent has reloaded the bundle.
	// Default 2m (ConfigMap watches deliver in seconds; kubelet-mounted
	// files take up to ~1m).
	Propagation time.Duration
	// Margin is added to the SVID TTL before the old root is dropped, for
	// clock skew. Default 5m.
	Margin time.Duration
	// Persist stores and publishes the authority's current signer and
	// bundle. Rotation calls it after every step and does not move on until
	// it succeeds (retrying with backoff), so agents never see an SVID
	// signed by a root they were not given.
	Persist func(ctx context.Context, signer *Signer, roots []*x509.Certificate) error
	Log     *slog.Logger
}

func (c *RotationConfig) defaults() {
	if c.Propagation == 0 {
		c.Propagation = 2 * time.Minute
	}
	if c.Margin == 0 {
		c.Margin = 5 * time.Minute
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// Rotate moves the authority to next with an overlap window:
//
//  1. trust next's root alongside the old one, publish, wait Propagation;
//  2. sign with next, publish;
//  3. wait until every SVID signed by the old root has expired (TTL +
//     Margin), then drop the old root and publish.
//
// Peers holding either root's SVIDs verify each other throughout. If ctx
// ends early the authority stays in a consistent, persisted state (both
// roots trusted), and RetireRoots can finish the job later.
func (a *Authority) Rotate(ctx context.Context, next *Signer, cfg RotationConfig) error {
	cfg.defaults()
	if err := next.Validate(a.now()); err != nil {
		return fmt.Errorf("rotating CA: %w", err)
	}
	old := a.ActiveSigner()
	cfg.Log.Info("CA rotation: trusting new root", "new_root", next.Root.Subject.String(), "old_root", old.Root.Subject.String())
	a.TrustRoot(next.Root)
	if err := a.persist(ctx, cfg); err != nil {
		return err
	}
	if err := sleep(ctx, cfg.Propagation); err != nil {
		return fmt.Errorf("rotating CA: waiting for the new bundle to propagate: %w", err)
	}
	if err := a.Activate(next); err != nil {
		return fmt.Errorf("rotating CA: %w", err)
	}
	cfg.Log.Info("CA rotation: signing with new root")
	if err := a.persist(ctx, cfg); err != nil {
		return err
	}
	if old.Root.Equal(next.Root) {
		return nil // a new intermediate under the same root: nothing to retire
	}
	return a.RetireRoots(ctx, a.ttl+cfg.Margin, cfg)
}

// RetireRoots waits after, then drops every trusted root other than the
// active signer's and persists. Call it on start-up when the stored bundle
// still holds roots from an interrupted rotation.
func (a *Authority) RetireRoots(ctx context.Context, after time.Duration, cfg RotationConfig) error {
	cfg.defaults()
	if err := sleep(ctx, after); err != nil {
		return fmt.Errorf("rotating CA: waiting for SVIDs of the old root to expire: %w", err)
	}
	active := a.ActiveSigner().Root
	for _, r := range a.Bundle() {
		if !r.Equal(active) {
			if err := a.RetireRoot(r); err != nil {
				return fmt.Errorf("rotating CA: %w", err)
			}
			cfg.Log.Info("CA rotation: old root retired", "root", r.Subject.String())
		}
	}
	return a.persist(ctx, cfg)
}

// Persist stores and publishes the current state with cfg.Persist,
// retrying with backoff until it succeeds or ctx ends.
func (a *Authority) Persist(ctx context.Context, cfg RotationConfig) error {
	cfg.defaults()
	return a.persist(ctx, cfg)
}

func (a *Authority) persist(ctx context.Context, cfg RotationConfig) error {
	if cfg.Persist == nil {
		return nil
	}
	backoff := 500 * time.Millisecond
	for {
		a.mu.RLock()
		s, roots := a.signer, a.roots
		a.mu.RUnlock()
		err := cfg.Persist(ctx, s, roots)
		if err == nil {
			return nil
		}
		cfg.Log.Warn("CA rotation: persisting CA state failed; retrying", "error", err, "retry_in", backoff)
		if err := sleep(ctx, backoff); err != nil {
			return fmt.Errorf("rotating CA: persisting CA state: %w", err)
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
