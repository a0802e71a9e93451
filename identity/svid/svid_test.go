package svid_test

import (
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
	"github.com/nodemesh/nodemesh/identity/identitytest"
	"github.com/nodemesh/nodemesh/identity/svid"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	webID = spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/web")
	dbID  = spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/db")
)

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

type env struct {
	ca   *identitytest.CA
	pods *identitytest.Pods
	m    *svid.Manager
}

// newEnv starts a real CA on loopback (in-memory authenticator and pods)
// and a Manager for node-a talking to it over HTTPS.
func newEnv(t *testing.T, ttl time.Duration) *env {
	authn := &identitytest.Authn{Callers: map[string]ca.Caller{"tok-a": {User: "agent", Node: "node-a"}}}
	pods := &identitytest.Pods{}
	pods.Put("node-a", identity.Workload{Namespace: "app", ServiceAccount: "web"}, "web-1")
	pods.Put("node-a", identity.Workload{Namespace: "app", ServiceAccount: "db"}, "db-1")
	c := identitytest.NewCA(t, identitytest.CAOptions{Authn: authn, Pods: pods, TTL: ttl, Backdate: time.Second})
	m, client, err := svid.NewWithCA(
		svid.Config{TrustDomain: td, Log: testLog(t), BackoffMin: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond},
		svid.ClientConfig{URL: c.URL, CAID: c.ID, Token: func(context.Context) (string, error) { return "tok-a", nil }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	if err := m.SetBundle(c.Authority.Bundle()); err != nil { // as the ConfigMap watcher would
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return &env{ca: c, pods: pods, m: m}
}

func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestManagerIssuesAndHandshakes(t *testing.T) {
	e := newEnv(t, time.Hour)
	for _, owner := range []string{"uid-web-1", "uid-web-2"} {
		if err := e.m.Add(owner, webID); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.m.Add("uid-db-1", dbID); err != nil {
		t.Fatal(err)
	}
	ctx := waitCtx(t)
	for _, id := range []spiffeid.ID{webID, dbID} {
		if err := e.m.Wait(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	serverSaw, clientSaw, err := identitytest.Handshake(ctx, identitytest.ClientTLS(t, e.m, webID, dbID), identitytest.ServerTLS(t, e.m, dbID))
	if err != nil {
		t.Fatal(err)
	}
	if serverSaw != webID || clientSaw != dbID {
		t.Fatalf("server saw %s, client saw %s", serverSaw, clientSaw)
	}
	// The client requires the expected peer: a server presenting web is refused.
	if _, _, err := identitytest.Handshake(ctx, identitytest.ClientTLS(t, e.m, webID, dbID), identitytest.ServerTLS(t, e.m, webID)); err == nil {
		t.Fatal("client accepted a server with the wrong SPIFFE ID")
	}
	// One of two web pods leaves: web stays. The second leaves: web is dropped.
	e.m.Remove("uid-web-1")
	if _, err := e.m.SVIDSource(webID).GetX509SVID(); err != nil {
		t.Fatalf("web dropped while a pod still runs: %v", err)
	}
	e.m.Remove("uid-web-2")
	if _, err := e.m.SVIDSource(webID).GetX509SVID(); !errors.Is(err, svid.ErrNoSVID) {
		t.Fatalf("web still presented after its last pod left: %v", err)
	}
	if _, _, err := identitytest.Handshake(ctx, identitytest.ClientTLS(t, e.m, webID, dbID), identitytest.ServerTLS(t, e.m, dbID)); err == nil {
		t.Fatal("handshake as a dropped identity succeeded")
	}
	if got := e.m.IDs(); len(got) != 1 || got[0] != dbID {
		t.Fatalf("IDs %v", got)
	}
}

func TestManagerRetriesRefusalUntilPodArrives(t *testing.T) {
	e := newEnv(t, time.Hour)
	apiID := spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/api")
	if err := e.m.Add("uid-api", apiID); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := e.m.Wait(short, apiID); err == nil {
		t.Fatal("got an SVID for a workload not on the node")
	}
	_, err := e.m.SVIDSource(apiID).GetX509SVID()
	if identity.RefusalCode(err) != identity.CodeNoWorkload {
		t.Fatalf("source error %v, want the CA's %s refusal", err, identity.CodeNoWorkload)
	}
	e.pods.Put("node-a", identity.Workload{Namespace: "app", ServiceAccount: "api"}, "api-1")
	if err := e.m.Wait(waitCtx(t), apiID); err != nil {
		t.Fatal(err)
	}
}

func TestManagerRejectsOutsideTrustDomain(t *testing.T) {
	e := newEnv(t, time.Hour)
	if err := e.m.Add("x", spiffeid.RequireFromString("spiffe://other.example/ns/app/sa/web")); err == nil {
		t.Fatal("accepted an identity of another trust domain")
	}
	if err := e.m.Add("x", spiffeid.RequireFromString("spiffe://cluster.local/agent")); err == nil {
		t.Fatal("accepted a non-workload identity")
	}
	if _, err := e.m.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.example")); err == nil {
		t.Fatal("bundle for a foreign trust domain")
	}
	if err := e.m.SetBundle(nil); err == nil {
		t.Fatal("accepted an empty bundle")
	}
}

// TestClientRequiresCAIdentity: an agent talks only to a CA presenting the
// expected SPIFFE ID, even when its certificate chains to the bundle.
func TestClientRequiresCAIdentity(t *testing.T) {
	e := newEnv(t, time.Hour)
	client, err := svid.NewClient(svid.ClientConfig{
		URL: e.ca.URL, CAID: spiffeid.RequireFromString("spiffe://cluster.local/ns/nodemesh-system/sa/other"),
		Bundle: e.m, Token: func(context.Context) (string, error) { return "tok-a", nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	_, err = client.Sign(waitCtx(t), webID, nil)
	if err == nil || !strings.Contains(err.Error(), "unexpected ID") {
		t.Fatalf("got %v, want a refusal of the CA's serving identity", err)
	}
}

// slowSigner counts concurrent requests.
type slowSigner struct {
	inner       svid.Signer
	cur, maxCur atomic.Int32
}

func (s *slowSigner) Sign(ctx context.Context, id spiffeid.ID, csr []byte) (*svid.Signed, error) {
	n := s.cur.Add(1)
	defer s.cur.Add(-1)
	for {
		m := s.maxCur.Load()
		if n <= m || s.maxCur.CompareAndSwap(m, n) {
			break
		}
	}
	time.Sleep(20 * time.Millisecond)
	return s.inner.Sign(ctx, id, csr)
}

type authoritySigner struct{ a *ca.Authority }

func (s authoritySigner) Sign(_ context.Context, id spiffeid.ID, csrDER []byte) (*svid.Signed, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	iss, err := s.a.Sign(id, csr.PublicKey)
	if err != nil {
		return nil, err
	}
	return &svid.Signed{Chain: iss.Chain, Bundle: iss.Bundle}, nil
}

func TestManagerLimitsConcurrentRequests(t *testing.T) {
	root, err := ca.NewRootSigner(td, time.Hour*24, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: root})
	if err != nil {
		t.Fatal(err)
	}
	s := &slowSigner{inner: authoritySigner{a}}
	m, err := svid.New(svid.Config{TrustDomain: td, CA: s, Log: testLog(t), MaxConcurrent: 2})
	if err != nil {
		t.Fatal(err)
	}
	var ids []spiffeid.ID
	for i := range 12 {
		id, err := identity.WorkloadID(td, "app", "sa"+string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
		if err := m.Add(id.String(), id); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = m.Run(ctx) }()
	defer func() { cancel(); wg.Wait() }()
	for _, id := range ids {
		if err := m.Wait(waitCtx(t), id); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.maxCur.Load(); got > 2 || got < 1 {
		t.Fatalf("max concurrent CA requests %d, want <= 2", got)
	}
	// The bundle came with the responses.
	if _, err := m.GetX509BundleForTrustDomain(td); err != nil {
		t.Fatal(err)
	}
}
