package workload_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
	"github.com/nodemesh/nodemesh/identity/identitytest"
	wl "github.com/nodemesh/nodemesh/identity/workload"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	webID = spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/web")
	dbID  = spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/db")
)

// fakeAPI is a SPIFFE Workload API server (the part SPIRE's agent serves):
// it streams X509SVIDResponses and pushes a new one on every publish.
type fakeAPI struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	mu      sync.Mutex
	current *workload.X509SVIDResponse
	changed chan struct{}
}

func (f *fakeAPI) publish(r *workload.X509SVIDResponse) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.current = r
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeAPI) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	for {
		f.mu.Lock()
		cur, ch := f.current, f.changed
		f.mu.Unlock()
		if cur != nil {
			if err := stream.Send(cur); err != nil {
				return err
			}
		}
		select {
		case <-ch:
		case <-stream.Context().Done():
			return nil
		}
	}
}

func issue(t *testing.T, a *ca.Authority, ids ...spiffeid.ID) *workload.X509SVIDResponse {
	t.Helper()
	resp := &workload.X509SVIDResponse{}
	for _, id := range ids {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		iss, err := a.Sign(id, key.Public())
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		var chain, bundle []byte
		for _, c := range iss.Chain {
			chain = append(chain, c.Raw...)
		}
		for _, c := range iss.Bundle {
			bundle = append(bundle, c.Raw...)
		}
		resp.Svids = append(resp.Svids, &workload.X509SVID{SpiffeId: id.String(), X509Svid: chain, X509SvidKey: keyDER, Bundle: bundle})
	}
	return resp
}

func newAuthority(t *testing.T, ttl time.Duration) *ca.Authority {
	root, err := ca.NewRootSigner(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: root, TTL: ttl, Backdate: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestWorkloadAPISource runs the agent's alternative identity source against
// a Workload API server on a unix socket: SVIDs for two identities, mTLS
// between them, a pushed rotation to a new root (with both roots in the
// bundle) picked up without restart, and an identity withdrawn.
func TestWorkloadAPISource(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	api := &fakeAPI{changed: make(chan struct{})}
	gs := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(gs, api)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = gs.Serve(ln) }()
	defer func() { gs.Stop(); wg.Wait() }()

	a := newAuthority(t, time.Hour)
	api.publish(issue(t, a, webID, dbID))

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := wl.New(ctx, "unix://"+sock, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := src.Run(runCtx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	defer stop()
	if err := src.WaitUntilUpdated(ctx); err != nil {
		t.Fatal(err)
	}
	var p identity.Provider = src
	handshake := func() error {
		serverSaw, clientSaw, err := identitytest.Handshake(ctx, identitytest.ClientTLS(t, p, webID, dbID), identitytest.ServerTLS(t, p, dbID))
		if err == nil && (serverSaw != webID || clientSaw != dbID) {
			err = errors.New("wrong peer IDs " + serverSaw.String() + " " + clientSaw.String())
		}
		return err
	}
	if err := handshake(); err != nil {
		t.Fatal(err)
	}

	// Rotation pushed by the endpoint: new root, bundle with both roots.
	old, _ := src.SVIDSource(dbID).GetX509SVID()
	next, err := ca.NewRootSigner(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a.TrustRoot(next.Root)
	if err := a.Activate(next); err != nil {
		t.Fatal(err)
	}
	updated := src.Updated()
	api.publish(issue(t, a, webID, dbID))
	select {
	case <-updated:
	case <-ctx.Done():
		t.Fatal("no update after the rotation")
	}
	cur, err := src.SVIDSource(dbID).GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if cur.Certificates[0].Equal(old.Certificates[0]) || cur.Certificates[0].CheckSignatureFrom(next.Root) != nil {
		t.Fatal("SVID not replaced by one from the new root")
	}
	if err := handshake(); err != nil {
		t.Fatalf("after rotation: %v", err)
	}

	// db withdrawn: fail closed for db, web unaffected.
	updated = src.Updated()
	api.publish(issue(t, a, webID))
	<-updated
	if _, err := src.SVIDSource(dbID).GetX509SVID(); !errors.Is(err, wl.ErrNoSVID) {
		t.Fatalf("withdrawn identity still served: %v", err)
	}
	if _, err := src.SVIDSource(webID).GetX509SVID(); err != nil {
		t.Fatal(err)
	}
	if err := handshake(); err == nil {
		t.Fatal("handshake as a withdrawn identity succeeded")
	}
}

// TestWorkloadAPIExpiredFailsClosed: an SVID that expires while the endpoint
// sends nothing newer is no longer presented.
func TestWorkloadAPIExpiredFailsClosed(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	api := &fakeAPI{changed: make(chan struct{})}
	gs := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(gs, api)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = gs.Serve(ln) }()
	defer func() { gs.Stop(); wg.Wait() }()
	api.publish(issue(t, newAuthority(t, 2*time.Second), webID))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := wl.New(ctx, "unix://"+sock, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() { defer wg.Done(); _ = src.Run(ctx) }()
	defer cancel()
	if err := src.WaitUntilUpdated(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := src.SVIDSource(webID).GetX509SVID(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond)
	if _, err := src.SVIDSource(webID).GetX509SVID(); !errors.Is(err, wl.ErrNoSVID) {
		t.Fatalf("expired SVID still presented: %v", err)
	}
}

func TestNewRejectsBadAddress(t *testing.T) {
	if _, err := wl.New(context.Background(), "tcp://not-an-ip:1", slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("accepted a bad address")
	}
}
