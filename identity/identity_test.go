package identity_test

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
	"github.com/nodemesh/nodemesh/identity/identitytest"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func TestWorkloadID(t *testing.T) {
	for _, tc := range []struct {
		ns, sa string
		want   string // "" = error
	}{
		{"app", "web", "spiffe://cluster.local/ns/app/sa/web"},
		{"kube-system", "coredns", "spiffe://cluster.local/ns/kube-system/sa/coredns"},
		{"app", "web.v2", "spiffe://cluster.local/ns/app/sa/web.v2"},
		{"app", "", ""},
		{"", "web", ""},
		{"app", "a/b", ""},
		{"App", "web", ""},
		{"app", "-web", ""},
		{"app", "web-", ""},
		{"a.b", "web", ""}, // namespaces are DNS labels: no dots
		{"app", "..", ""},
		{strings.Repeat("a", 64), "web", ""},
	} {
		id, err := identity.WorkloadID(td, tc.ns, tc.sa)
		if tc.want == "" {
			if err == nil {
				t.Errorf("WorkloadID(%q, %q) = %s, want error", tc.ns, tc.sa, id)
			}
			continue
		}
		if err != nil || id.String() != tc.want {
			t.Errorf("WorkloadID(%q, %q) = %v, %v; want %s", tc.ns, tc.sa, id, err, tc.want)
			continue
		}
		_, w, err := identity.ParseWorkloadID(id.String())
		if err != nil || w != (identity.Workload{Namespace: tc.ns, ServiceAccount: tc.sa}) {
			t.Errorf("round trip of %s: %v %v", id, w, err)
		}
	}
}

func FuzzParseWorkloadID(f *testing.F) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/app/sa/web", "spiffe://cluster.local/ns/app/sa/web/x",
		"spiffe://cluster.local/ns//sa/web", "spiffe://td/ns/a/sa/b%2F", "spiffe://cluster.local/ns/a/sa/..",
		"https://cluster.local/ns/a/sa/b", "spiffe://CLUSTER.local/ns/a/sa/b", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, w, err := identity.ParseWorkloadID(s)
		if err != nil {
			return
		}
		// Whatever parses must rebuild to the same ID: no two spellings of
		// one identity, no identity smuggled through odd characters.
		again, err := identity.WorkloadID(id.TrustDomain(), w.Namespace, w.ServiceAccount)
		if err != nil {
			t.Fatalf("%q parsed as %v but does not rebuild: %v", s, w, err)
		}
		if again != id || id.String() != s {
			t.Fatalf("%q parsed as %s, rebuilds as %s", s, id, again)
		}
	})
}

func provider(t testing.TB, ids ...spiffeid.ID) *identitytest.StaticProvider {
	t.Helper()
	root, err := ca.NewRootSigner(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: root})
	if err != nil {
		t.Fatal(err)
	}
	p, err := identitytest.NewStaticProvider(a, ids...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var (
	webID = spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/web")
	dbID  = spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/db")
)

func TestTLSConfigs(t *testing.T) {
	p := provider(t, webID, dbID)
	other := provider(t, webID) // same ID, another (untrusted) root
	ctx := context.Background()
	cc := identitytest.ClientTLS(t, p, webID, dbID)
	sc := identitytest.ServerTLS(t, p, dbID)
	if cc.MinVersion != tls.VersionTLS13 || sc.MinVersion != tls.VersionTLS13 {
		t.Fatal("configs allow TLS below 1.3")
	}
	if s, c, err := identitytest.Handshake(ctx, cc, sc); err != nil || s != webID || c != dbID {
		t.Fatalf("handshake: %v %v %v", s, c, err)
	}
	// The client accepts only db: web as the server is refused.
	if _, _, err := identitytest.Handshake(ctx, cc, identitytest.ServerTLS(t, p, webID)); err == nil {
		t.Error("client accepted a server other than the one it asked for")
	}
	// A client with a certificate from another root is refused.
	if _, _, err := identitytest.Handshake(ctx, identitytest.ClientTLS(t, mixed{other, p}, webID, dbID), sc); err == nil {
		t.Error("server accepted a client certificate from an untrusted root")
	}
	// A TLS 1.2 client is refused.
	c12 := identitytest.ClientTLS(t, p, webID, dbID)
	c12.MaxVersion = tls.VersionTLS12
	if _, _, err := identitytest.Handshake(ctx, c12, sc); err == nil {
		t.Error("TLS 1.2 handshake succeeded")
	}
}

// mixed presents svids' certificates but verifies with bundles' roots.
type mixed struct{ svids, bundles *identitytest.StaticProvider }

func (m mixed) SVIDSource(id spiffeid.ID) x509svid.Source { return m.svids.SVIDSource(id) }
func (m mixed) GetX509BundleForTrustDomain(d spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return m.bundles.GetX509BundleForTrustDomain(d)
}

// BenchmarkHandshake measures a full TLS 1.3 mTLS handshake with these
// certificates (ECDSA P-256 SVIDs, SPIFFE verification and authorization on
// both sides), client and server CPU together, over an in-memory pipe.
func BenchmarkHandshake(b *testing.B) {
	p := provider(b, webID, dbID)
	cc := identitytest.ClientTLS(b, p, webID, dbID)
	sc := identitytest.ServerTLS(b, p, dbID)
	b.ReportAllocs()
	cpu0 := identitytest.CPUTime()
	for b.Loop() {
		c1, c2 := net.Pipe()
		errc := make(chan error, 1)
		go func() {
			s := tls.Server(c2, sc)
			err := s.Handshake()
			if err == nil {
				// net.Pipe is unbuffered: the client must read past the
				// session tickets, so give it one byte to read.
				_, err = s.Write([]byte{1})
			}
			errc <- err
			c2.Close()
		}()
		c := tls.Client(c1, cc)
		if err := c.Handshake(); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 1)); err != nil {
			b.Fatal(err)
		}
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
		c1.Close()
	}
	cpu := identitytest.CPUTime() - cpu0
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/handshake")
}
