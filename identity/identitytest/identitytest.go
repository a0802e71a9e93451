// Package identitytest has test doubles and fixtures for the identity
// packages: an in-memory authenticator and pod finder, and a real CA
// (identity/ca) serving HTTPS on loopback that can be stopped and started
// again at the same address to simulate outages.
package identitytest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
)

// Authn maps tokens to callers; unknown tokens are refused as invalid.
type Authn struct {
	mu      sync.Mutex
	Callers map[string]ca.Caller
}

// Authenticate implements ca.Authenticator.
func (a *Authn) Authenticate(_ context.Context, token string) (ca.Caller, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if token == "" {
		return ca.Caller{}, &ca.Refusal{Code: identity.CodeUnauthenticated, Msg: "no token"}
	}
	c, ok := a.Callers[token]
	if !ok {
		return ca.Caller{}, &ca.Refusal{Code: identity.CodeTokenInvalid, Msg: "unknown token"}
	}
	return c, nil
}

// Pods is a set of running pods: node -> "ns/sa" -> pod name.
type Pods struct {
	mu   sync.Mutex
	pods map[string]map[string]string
}

// Put records a running pod of w on node.
func (p *Pods) Put(node string, w identity.Workload, name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pods == nil {
		p.pods = map[string]map[string]string{}
	}
	if p.pods[node] == nil {
		p.pods[node] = map[string]string{}
	}
	p.pods[node][w.String()] = name
}

// RunningPod implements ca.PodFinder.
func (p *Pods) RunningPod(_ context.Context, node string, w identity.Workload) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pods[node][w.String()], nil
}

// SyncBuffer is a goroutine-safe log sink.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// CA is a real CA server on loopback.
type CA struct {
	Authority *ca.Authority
	Server    *ca.Server
	ID        spiffeid.ID // serving identity
	URL       string
	Addr      string
	Log       *SyncBuffer // JSON log lines, including the audit log

	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan error
}

// CAOptions configures NewCA.
type CAOptions struct {
	TrustDomain spiffeid.TrustDomain // default cluster.local
	TTL         time.Duration        // default 1h
	Backdate    time.Duration
	Authn       ca.Authenticator
	Pods        ca.PodFinder
}

// NewCA builds a CA with a fresh root and starts serving on 127.0.0.1.
// It is stopped at the end of the test.
func NewCA(t testing.TB, o CAOptions) *CA {
	t.Helper()
	if o.TrustDomain.IsZero() {
		o.TrustDomain = spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain)
	}
	root, err := ca.NewRootSigner(o.TrustDomain, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: o.TrustDomain, Signer: root, TTL: o.TTL, Backdate: o.Backdate})
	if err != nil {
		t.Fatal(err)
	}
	logs := &SyncBuffer{}
	id, err := identity.WorkloadID(o.TrustDomain, "nodemesh-system", "nodemesh-ca")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.NewServer(ca.ServerConfig{
		Authority: a, Authn: o.Authn, Pods: o.Pods, ServingID: id,
		Log: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	c := &CA{Authority: a, Server: srv, ID: id, Log: logs}
	if err := c.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c
}

// Start serves at addr ("" = the previous address).
func (c *CA) Start(addr string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cancel != nil {
		return errors.New("CA already running")
	}
	if addr == "" {
		addr = c.Addr
	}
	var ln net.Listener
	var err error
	// The old socket may linger briefly after Stop; retry a little.
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("listening for test CA: %w", err)
	}
	c.Addr = ln.Addr().String()
	c.URL = "https://" + c.Addr
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel, c.done = cancel, make(chan error, 1)
	go func(done chan error) { done <- c.Server.Serve(ctx, ln) }(c.done)
	return nil
}

// Stop stops serving (idempotent) and waits for the server to exit.
func (c *CA) Stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cancel == nil {
		return
	}
	c.cancel()
	<-c.done
	c.cancel = nil
}

// Handshake runs one TLS handshake over a loopback TCP connection between
// a client with cc and a server with sc, then exchanges one byte each way.
// It returns the SPIFFE IDs each side verified.
func Handshake(ctx context.Context, cc, sc *tls.Config) (serverSaw, clientSaw spiffeid.ID, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return serverSaw, clientSaw, err
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	type result struct {
		id  spiffeid.ID
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		tc := tls.Server(c, sc)
		if err := tc.HandshakeContext(ctx); err != nil {
			done <- result{err: fmt.Errorf("server handshake: %w", err)}
			return
		}
		buf := make([]byte, 1)
		if _, err := io.ReadFull(tc, buf); err != nil {
			done <- result{err: fmt.Errorf("server read: %w", err)}
			return
		}
		if _, err := tc.Write(buf); err != nil {
			done <- result{err: fmt.Errorf("server write: %w", err)}
			return
		}
		id, err := hbone.PeerID(tc.ConnectionState())
		done <- result{id: id, err: err}
	}()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		return serverSaw, clientSaw, err
	}
	defer raw.Close()
	tc := tls.Client(raw, cc)
	cerr := tc.HandshakeContext(ctx)
	if cerr == nil {
		if _, cerr = tc.Write([]byte{1}); cerr == nil {
			_, cerr = io.ReadFull(tc, make([]byte, 1))
		}
	}
	if cerr == nil {
		clientSaw, cerr = hbone.PeerID(tc.ConnectionState())
	}
	if cerr != nil {
		raw.Close()
		ln.Close()
		<-done
		return serverSaw, clientSaw, fmt.Errorf("client: %w", cerr)
	}
	r := <-done
	return r.id, clientSaw, r.err
}

// ClientTLS is the mTLS client config the agent builds (hbone.SPIFFETLS
// over p) for a connection from src to exactly dst; it fails t when the
// builder refuses.
func ClientTLS(t testing.TB, p identity.Provider, src, dst spiffeid.ID) *tls.Config {
	t.Helper()
	c, err := hbone.SPIFFETLS{SVID: identity.SVIDFunc(p), Bundles: p}.ClientTLS(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// ServerTLS is the agent's mTLS server config for local over p: it accepts
// any client of local's trust domain.
func ServerTLS(t testing.TB, p identity.Provider, local spiffeid.ID) *tls.Config {
	t.Helper()
	c, err := hbone.SPIFFETLS{SVID: identity.SVIDFunc(p), Bundles: p}.ServerTLS(local)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// StaticProvider is an identity.Provider holding fixed SVIDs, signed by an
// Authority; for tests of code that only consumes identities.
type StaticProvider struct {
	TD    spiffeid.TrustDomain
	SVIDs map[spiffeid.ID]*x509svid.SVID
	Roots []*x509.Certificate
}

// NewStaticProvider signs an SVID for each id with a.
func NewStaticProvider(a *ca.Authority, ids ...spiffeid.ID) (*StaticProvider, error) {
	p := &StaticProvider{TD: a.TrustDomain(), SVIDs: map[spiffeid.ID]*x509svid.SVID{}, Roots: a.Bundle()}
	for _, id := range ids {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		iss, err := a.Sign(id, key.Public())
		if err != nil {
			return nil, err
		}
		p.SVIDs[id] = &x509svid.SVID{ID: id, Certificates: iss.Chain, PrivateKey: key}
	}
	return p, nil
}

// SVIDSource implements identity.Provider.
func (p *StaticProvider) SVIDSource(id spiffeid.ID) x509svid.Source {
	return sourceFunc(func() (*x509svid.SVID, error) {
		if s := p.SVIDs[id]; s != nil {
			return s, nil
		}
		return nil, fmt.Errorf("no SVID for %s", id)
	})
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (p *StaticProvider) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != p.TD {
		return nil, fmt.Errorf("no bundle for %s", td)
	}
	return x509bundle.FromX509Authorities(td, p.Roots), nil
}

type sourceFunc func() (*x509svid.SVID, error)

func (f sourceFunc) GetX509SVID() (*x509svid.SVID, error) { return f() }

// CPUTime returns the CPU time (user + system) the process has used so far.
// Benchmarks divide by it to report per-core rates that do not depend on
// how busy the rest of the machine is.
func CPUTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
