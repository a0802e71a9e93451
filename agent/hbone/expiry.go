package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// Certificates are checked only in the TLS handshake, and a pooled
// connection can outlive the SVIDs it was opened with: without a bound a
// tunnel opened a minute before its peer's SVID expired would carry new
// streams for as long as it stays busy. So each connection stops taking
// new streams at the earliest NotAfter of the certificates its handshake
// relied on — the peer's chain as verified, and the chain this end
// presented — by sending GOAWAY: the pool opens no new stream on it (the
// next one dials a new connection, which needs a valid SVID on both ends
// and so fails closed if there is none), the server refuses streams
// beyond the GOAWAY with REFUSED_STREAM, and the streams already open end
// normally, after which the connection closes (a graceful drain, as on
// SIGTERM). Live streams are not cut: closing those is the policy
// re-evaluation's job, as docs/security.md says.
//
// The trust anchor itself is not part of the peer's chain; its expiry
// bounds the leaf's, since the CA never signs past its own NotAfter.

// ownCert records the certificate chain a handshake presented.
type ownCert struct {
	cert *tls.Certificate
}

// record wraps cfg (a clone owned by one handshake) so that the chain it
// presents is remembered. The handshake runs the callbacks in the calling
// goroutine, so reading o after it returns needs no lock.
func (o *ownCert) record(cfg *tls.Config) {
	if get := cfg.GetCertificate; get != nil {
		cfg.GetCertificate = func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
			c, err := get(h)
			o.cert = c
			return c, err
		}
	}
	if get := cfg.GetClientCertificate; get != nil {
		cfg.GetClientCertificate = func(r *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := get(r)
			o.cert = c
			return c, err
		}
	}
	if cfg.GetCertificate == nil && cfg.GetClientCertificate == nil && len(cfg.Certificates) > 0 {
		o.cert = &cfg.Certificates[0]
	}
}

// certsExpiry returns the earliest NotAfter among the peer's certificates
// (leaf and the intermediates it sent, which go-spiffe verified as its
// chain) and the chain this end presented. Zero if there is none.
func certsExpiry(cs tls.ConnectionState, own *ownCert) time.Time {
	var at time.Time
	earliest := func(c *x509.Certificate) {
		if c != nil && (at.IsZero() || c.NotAfter.Before(at)) {
			at = c.NotAfter
		}
	}
	for _, c := range cs.PeerCertificates {
		earliest(c)
	}
	if own != nil && own.cert != nil {
		if own.cert.Leaf != nil {
			earliest(own.cert.Leaf)
		}
		for i, der := range own.cert.Certificate {
			if i == 0 && own.cert.Leaf != nil {
				continue
			}
			// Only at handshake rate, and go-spiffe sets Leaf, so this
			// parses intermediates at most.
			if c, err := x509.ParseCertificate(der); err == nil {
				earliest(c)
			}
		}
	}
	return at
}

// expiredAt refuses a connection whose handshake relied on a certificate
// that has already expired (ours: an SVID source should not hand one out;
// the peer's expiring between its verification and now). Such a
// connection would be drained at once, and the pool would dial again and
// again.
func expiredAt(at time.Time) error {
	if !at.IsZero() && !time.Now().Before(at) {
		return fmt.Errorf("a certificate of the handshake expired at %s (is the SVID being renewed? the CA may be unreachable)", at.UTC().Format(time.RFC3339))
	}
	return nil
}

// drainAt stops new streams on c at the time at (when a certificate its
// handshake relied on expires): GOAWAY, then a graceful close once its
// streams have ended. expired counts such connections. The timer goes
// with the connection.
func (c *conn) drainAt(at time.Time, expired *atomic.Uint64) {
	if at.IsZero() {
		return
	}
	t := time.AfterFunc(time.Until(at), func() {
		c.mu.Lock()
		live := !c.closed && !c.goAwaySent && c.closing == nil
		c.mu.Unlock()
		if !live {
			return
		}
		expired.Add(1)
		c.log.Debug("a certificate of this HBONE connection expired; no new streams on it, draining",
			"remote", c.remote.String(), "peer", c.peer.String(), "not_after", at)
		c.goAway(http2.ErrCodeNo, "certificate expired")
	})
	context.AfterFunc(c.ctx, func() { t.Stop() })
}
