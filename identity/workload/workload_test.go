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
	"os"
	"path/filepath"
	"strings"
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
// publish(nil) makes it answer as SPIRE does when no entry matches the
// caller: the stream ends with PermissionDenied "no identity issued".
type fakeAPI struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	mu      sync.Mutex
	current *workload.X509SVIDResponse
	denied  bool
	changed chan struct{}
}

func (f *fakeAPI) publish(r *workload.X509SVIDResponse) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.current, f.denied = r, r == nil
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
		cur, ch, denied := f.current, f.changed, f.denied
		f.mu.Unlock()
		if denied {
			return status.Error(codes.PermissionDenied, "no identity issued")
		}
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
	src, err := wl.New(ctx, wl.Config{Addr: "unix://" + sock, TrustDomain: td, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	for owner, id := range map[string]spiffeid.ID{"web-pod": webID, "db-pod": dbID} {
		if err := src.Add(owner, id); err != nil {
			t.Fatal(err)
		}
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
	src, err := wl.New(ctx, wl.Config{Addr: "unix://" + sock, TrustDomain: td, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Add("web-pod", webID); err != nil {
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

func TestNewRejectsBadConfig(t *testing.T) {
	dir := t.TempDir()
	notSock := filepath.Join(dir, "file")
	if err := os.WriteFile(notSock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	for _, tc := range []struct {
		name string
		cfg  wl.Config
		want string
	}{
		{"bad address", wl.Config{Addr: "tcp://not-an-ip:1", TrustDomain: td, Log: log}, "address"},
		{"socket missing", wl.Config{Addr: "unix://" + filepath.Join(dir, "agent.sock"), TrustDomain: td, Log: log}, "is the SPIRE agent running on this node"},
		{"not a socket", wl.Config{Addr: "unix://" + notSock, TrustDomain: td, Log: log}, "not a unix socket"},
		{"no trust domain", wl.Config{Addr: "unix://" + notSock, Log: log}, "no trust domain"},
		{"no logger", wl.Config{Addr: "unix://" + notSock, TrustDomain: td}, "no logger"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := wl.New(context.Background(), tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if _, err := wl.New(context.Background(), wl.Config{Addr: "unix://" + filepath.Join(dir, "agent.sock"), TrustDomain: td, Log: log}); !errors.Is(err, wl.ErrSocketMissing) {
		t.Fatalf("missing socket: %v, want ErrSocketMissing", err)
	}
}

// serve starts api on a unix socket and returns a running Source for it,
// stopped (and waited for) when the test ends; runErr receives Run's result.
func serve(t *testing.T, api *fakeAPI, trust spiffeid.TrustDomain) (src *wl.Source, runErr <-chan error) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(gs, api)
	var wg sync.WaitGroup
	wg.Go(func() { _ = gs.Serve(ln) })
	ctx, cancel := context.WithCancel(context.Background())
	src, err = wl.New(ctx, wl.Config{Addr: "unix://" + sock, TrustDomain: trust, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	wg.Go(func() { errc <- src.Run(ctx) })
	t.Cleanup(func() { cancel(); gs.Stop(); wg.Wait() })
	return src, errc
}

func waitUpdate(t *testing.T, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatal("no update from the Workload API source")
	}
}

// TestWorkloadAPIPermissionDeniedDropsSVIDs: SPIRE ends the stream with
// PermissionDenied when the caller's last entry is deleted. That is an
// answer, not an outage: the SVIDs held are dropped at once, and come back
// when an entry does.
func TestWorkloadAPIPermissionDeniedDropsSVIDs(t *testing.T) {
	a := newAuthority(t, time.Hour)
	api := &fakeAPI{changed: make(chan struct{})}
	api.publish(issue(t, a, webID))
	src, _ := serve(t, api, td)
	if err := src.Add("web-pod", webID); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := src.WaitUntilUpdated(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := src.SVIDSource(webID).GetX509SVID(); err != nil {
		t.Fatal(err)
	}
	updated := src.Updated()
	api.publish(nil)
	waitUpdate(t, updated)
	if _, err := src.SVIDSource(webID).GetX509SVID(); !errors.Is(err, wl.ErrNoSVID) || !strings.Contains(err.Error(), "no identity issued") {
		t.Fatalf("after PermissionDenied: %v, want ErrNoSVID naming the refusal", err)
	}
	if got := src.Provided(); len(got) != 0 {
		t.Fatalf("still provided after PermissionDenied: %v", got)
	}
	// The entry is back: go-spiffe's watch retries (with backoff) and the
	// SVID returns without a restart.
	updated = src.Updated()
	api.publish(issue(t, a, webID))
	waitUpdate(t, updated)
	if _, err := src.SVIDSource(webID).GetX509SVID(); err != nil {
		t.Fatalf("after the entry came back: %v", err)
	}
}

// TestWorkloadAPIOnlyWantedPresented: an SVID the endpoint provides is
// presented only while a pod of the node runs as that identity.
func TestWorkloadAPIOnlyWantedPresented(t *testing.T) {
	api := &fakeAPI{changed: make(chan struct{})}
	api.publish(issue(t, newAuthority(t, time.Hour), webID, dbID))
	src, _ := serve(t, api, td)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := src.WaitUntilUpdated(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := src.SVIDSource(webID).GetX509SVID(); !errors.Is(err, wl.ErrNoSVID) {
		t.Fatalf("presented an identity no pod runs as: %v", err)
	}
	if err := src.Add("pod-a", webID); err != nil {
		t.Fatal(err)
	}
	if err := src.Add("pod-b", webID); err != nil {
		t.Fatal(err)
	}
	src.Remove("pod-a")
	if _, err := src.SVIDSource(webID).GetX509SVID(); err != nil {
		t.Fatalf("one of two owners left: %v", err)
	}
	src.Remove("pod-b")
	if _, err := src.SVIDSource(webID).GetX509SVID(); !errors.Is(err, wl.ErrNoSVID) {
		t.Fatalf("presented after its last pod left: %v", err)
	}
	if err := src.Add("pod-c", spiffeid.RequireFromString("spiffe://other.org/ns/app/sa/web")); err == nil {
		t.Fatal("Add accepted an identity of another trust domain")
	}
	if err := src.Add("pod-d", spiffeid.RequireFromString("spiffe://cluster.local/not/a/workload")); err == nil {
		t.Fatal("Add accepted a non-workload ID")
	}
	if got := src.Provided(); len(got) != 2 || got[0] != dbID || got[1] != webID {
		t.Fatalf("Provided = %v", got)
	}
}

// TestWorkloadAPITrustDomainMismatch: an endpoint of another trust domain
// (SPIRE's trust_domain differs from --trust-domain) stops Run with a
// clear error, and nothing it sent is used.
func TestWorkloadAPITrustDomainMismatch(t *testing.T) {
	api := &fakeAPI{changed: make(chan struct{})}
	api.publish(issue(t, newAuthority(t, time.Hour), webID))
	other := spiffeid.RequireTrustDomainFromString("example.org")
	src, runErr := serve(t, api, other)
	var err error
	select {
	case err = <-runErr:
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not stop on a trust domain mismatch")
	}
	if !errors.Is(err, wl.ErrTrustDomainMismatch) || !strings.Contains(err.Error(), `"example.org"`) || !strings.Contains(err.Error(), "cluster.local") {
		t.Fatalf("Run: %v, want ErrTrustDomainMismatch naming both trust domains", err)
	}
	if _, err := src.GetX509BundleForTrustDomain(other); err == nil {
		t.Fatal("a bundle is served after the mismatch")
	}
}
