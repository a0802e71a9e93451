package ca_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"math/big"
	"net/url"
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

func csrFor(t testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func p256(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func body(t testing.TB, id string, csr []byte) []byte {
	t.Helper()
	b, err := json.Marshal(identity.SignRequest{SPIFFEID: id, CSR: csr})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseSignRequest(t *testing.T) {
	good := csrFor(t, p256(t), nil)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Clone(good)
	tampered[len(tampered)-5] ^= 0xff // inside the signature
	const web = "spiffe://cluster.local/ns/app/sa/web"
	for _, tc := range []struct {
		name string
		body []byte
		code identity.Code
	}{
		{"ok", body(t, web, good), ""},
		{"not json", []byte("{"), identity.CodeBadRequest},
		{"unknown field", []byte(`{"spiffe_id":"` + web + `","csr":"","x":1}`), identity.CodeBadRequest},
		{"trailing data", append(body(t, web, good), []byte(`{}`)...), identity.CodeBadRequest},
		{"too big", bytes.Repeat([]byte(" "), identity.MaxRequestBytes+1), identity.CodeBadRequest},
		{"empty id", body(t, "", good), identity.CodeBadIdentity},
		{"not a workload id", body(t, "spiffe://cluster.local/agent", good), identity.CodeBadIdentity},
		{"sa with dot dot", body(t, "spiffe://cluster.local/ns/app/sa/..", good), identity.CodeBadIdentity},
		{"upper case ns", body(t, "spiffe://cluster.local/ns/App/sa/web", good), identity.CodeBadIdentity},
		{"extra segment", body(t, web+"/x", good), identity.CodeBadIdentity},
		{"other trust domain", body(t, "spiffe://evil.example/ns/app/sa/web", good), identity.CodeWrongTrustDomain},
		{"no csr", body(t, web, nil), identity.CodeBadCSR},
		{"garbage csr", body(t, web, []byte("not der")), identity.CodeBadCSR},
		{"rsa key", body(t, web, csrFor(t, rsaKey, nil)), identity.CodeWeakKey},
		{"p224 key", body(t, web, csrFor(t, p224, nil)), identity.CodeWeakKey},
		{"bad signature", body(t, web, tampered), identity.CodeBadCSRSignature},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, ref := ca.ParseSignRequest(tc.body, td)
			if tc.code == "" {
				if ref != nil {
					t.Fatalf("refused: %v", ref)
				}
				if req.ID.String() != web || req.Workload != (identity.Workload{Namespace: "app", ServiceAccount: "web"}) {
					t.Fatalf("parsed %v %v", req.ID, req.Workload)
				}
				return
			}
			if ref == nil {
				t.Fatalf("accepted, want %s", tc.code)
			}
			if ref.Code != tc.code {
				t.Fatalf("code %s (%s), want %s", ref.Code, ref.Msg, tc.code)
			}
			if ref.Msg == "" {
				t.Fatal("refusal without a message")
			}
		})
	}
}

type fixture struct {
	ca    *identitytest.CA
	authn *identitytest.Authn
	pods  *identitytest.Pods
}

func newFixture(t *testing.T) *fixture {
	authn := &identitytest.Authn{Callers: map[string]ca.Caller{
		"agent-a": {User: "system:serviceaccount:nodemesh-system:nodemesh-agent", Node: "node-a"},
	}}
	pods := &identitytest.Pods{}
	pods.Put("node-a", identity.Workload{Namespace: "app", ServiceAccount: "web"}, "web-1")
	pods.Put("node-b", identity.Workload{Namespace: "app", ServiceAccount: "db"}, "db-1")
	return &fixture{ca: identitytest.NewCA(t, identitytest.CAOptions{Authn: authn, Pods: pods, TTL: time.Hour, Backdate: 2 * time.Minute}), authn: authn, pods: pods}
}

func TestSignSetsOnlyTheSPIFFESAN(t *testing.T) {
	f := newFixture(t)
	key := p256(t)
	u, _ := url.Parse("spiffe://cluster.local/ns/kube-system/sa/admin")
	csr := csrFor(t, key, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: "admin"},
		DNSNames: []string{"kubernetes.default.svc"},
		URIs:     []*url.URL{u},
	})
	start := time.Now()
	resp, ref := f.ca.Server.Sign(context.Background(), "agent-a", body(t, "spiffe://cluster.local/ns/app/sa/web", csr))
	if ref != nil {
		t.Fatal(ref)
	}
	leaf, err := x509.ParseCertificate(resp.Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://cluster.local/ns/app/sa/web" {
		t.Errorf("URI SANs %v, want only the requested workload ID", leaf.URIs)
	}
	if len(leaf.DNSNames) != 0 || len(leaf.EmailAddresses) != 0 || len(leaf.IPAddresses) != 0 || leaf.Subject.CommonName != "" {
		t.Errorf("CSR content leaked into the SVID: dns %v cn %q", leaf.DNSNames, leaf.Subject.CommonName)
	}
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(key.Public()) {
		t.Error("SVID is not over the CSR's key")
	}
	if leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign != 0 {
		t.Error("SVID can sign certificates")
	}
	if nb := leaf.NotBefore; nb.After(start.Add(-time.Minute)) {
		t.Errorf("NotBefore %s not backdated", nb)
	}
	if life := time.Until(leaf.NotAfter); life > time.Hour || life < 59*time.Minute {
		t.Errorf("lifetime %s, want 1h", life)
	}
	roots, _ := parseAll(resp.Bundle)
	id, _, err := x509svid.ParseAndVerify(resp.Chain, x509bundle.FromX509Authorities(td, roots))
	if err != nil || id.String() != "spiffe://cluster.local/ns/app/sa/web" {
		t.Fatalf("SVID does not verify against the returned bundle: %v %v", id, err)
	}
	logs := f.ca.Log.String()
	if !strings.Contains(logs, `"decision":"issued"`) || !strings.Contains(logs, `"pod":"app/web-1"`) {
		t.Errorf("no issuance audit line:\n%s", logs)
	}
}

func parseAll(ders [][]byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for _, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// TestServerRefusals covers the refusals that need no API server (the
// TokenReview ones run against a real one in identity/k8s's lab tests), and
// checks each writes an audit line naming caller, node, identity and reason.
func TestServerRefusals(t *testing.T) {
	f := newFixture(t)
	csr := csrFor(t, p256(t), nil)
	for _, tc := range []struct {
		name, token, id string
		code            identity.Code
	}{
		{"no token", "", "spiffe://cluster.local/ns/app/sa/web", identity.CodeUnauthenticated},
		{"unknown token", "forged", "spiffe://cluster.local/ns/app/sa/web", identity.CodeTokenInvalid},
		{"pod on another node", "agent-a", "spiffe://cluster.local/ns/app/sa/db", identity.CodeNoWorkload},
		{"no such pod", "agent-a", "spiffe://cluster.local/ns/kube-system/sa/admin", identity.CodeNoWorkload},
		{"other trust domain", "agent-a", "spiffe://other.example/ns/app/sa/web", identity.CodeWrongTrustDomain},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, ref := f.ca.Server.Sign(context.Background(), tc.token, body(t, tc.id, csr))
			if ref == nil || ref.Code != tc.code {
				t.Fatalf("got %v, want %s", ref, tc.code)
			}
			line := auditLine(t, f.ca.Log.String(), tc.code, tc.id)
			if tc.token == "agent-a" && (line["node"] != "node-a" || line["caller"] != "system:serviceaccount:nodemesh-system:nodemesh-agent") {
				t.Errorf("audit line lacks caller/node: %v", line)
			}
		})
	}
}

func auditLine(t *testing.T, logs string, code identity.Code, id string) map[string]any {
	t.Helper()
	for _, l := range strings.Split(logs, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) != nil {
			continue
		}
		if m["msg"] == "audit" && m["decision"] == "refused" && m["reason"] == string(code) && m["spiffe_id"] == id {
			if m["level"] != "WARN" || m["detail"] == "" {
				t.Errorf("audit line %v: want level WARN and a detail", m)
			}
			return m
		}
	}
	t.Fatalf("no audit line for %s %s in:\n%s", code, id, logs)
	return nil
}

func TestRotateOverlap(t *testing.T) {
	now := time.Now()
	old, err := ca.NewRootSigner(td, 24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	next, err := ca.NewRootSigner(td, 24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: old, TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/web")
	var published [][]*x509.Certificate
	persist := func(_ context.Context, s *ca.Signer, roots []*x509.Certificate) error {
		published = append(published, roots)
		// Whatever is signed now must verify with what is published now.
		iss, err := a.Sign(id, p256(t).Public())
		if err != nil {
			return err
		}
		_, _, err = x509svid.Verify(iss.Chain, x509bundle.FromX509Authorities(td, roots))
		if err != nil {
			t.Errorf("SVID signed after publishing %d roots does not verify: %v", len(roots), err)
		}
		return nil
	}
	oldSVID, err := a.Sign(id, p256(t).Public())
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(next); err == nil {
		t.Fatal("activating a signer whose root is not trusted yet succeeded")
	}
	if err := a.Rotate(context.Background(), next, ca.RotationConfig{Propagation: 10 * time.Millisecond, Margin: 10 * time.Millisecond, Persist: persist}); err != nil {
		t.Fatal(err)
	}
	if len(published) != 3 || len(published[0]) != 2 || len(published[1]) != 2 || len(published[2]) != 1 || !published[2][0].Equal(next.Root) {
		t.Fatalf("published bundles %v, want [old new] [old new] [new]", lens(published))
	}
	// During the overlap the old SVID verified against the published bundle;
	// afterwards the old root is gone.
	if _, _, err := x509svid.Verify(oldSVID.Chain, x509bundle.FromX509Authorities(td, published[1]), x509svid.WithTime(now)); err != nil {
		t.Errorf("old SVID rejected during overlap: %v", err)
	}
	if _, _, err := x509svid.Verify(oldSVID.Chain, x509bundle.FromX509Authorities(td, a.Bundle()), x509svid.WithTime(now)); err == nil {
		t.Error("old root still trusted after retirement")
	}
	if err := a.RetireRoot(next.Root); err == nil {
		t.Error("retired the active root")
	}
}

func lens(b [][]*x509.Certificate) []int {
	var out []int
	for _, x := range b {
		out = append(out, len(x))
	}
	return out
}

// TestProvidedIntermediate signs with a cert-manager-shaped CA: an
// intermediate in tls.crt, its root in ca.crt.
func TestProvidedIntermediate(t *testing.T) {
	now := time.Now()
	root, err := ca.NewRootSigner(td, 48*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	ikey := p256(t)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "cert-manager intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, root.Cert, ikey.Public(), root.Key)
	if err != nil {
		t.Fatal(err)
	}
	inter, _ := x509.ParseCertificate(der)
	keyDER, _ := x509.MarshalECPrivateKey(ikey)
	keyPEM := "-----BEGIN EC PRIVATE KEY-----\n" + base64.StdEncoding.EncodeToString(keyDER) + "\n-----END EC PRIVATE KEY-----\n"

	if _, _, err := ca.ParseSigner(ca.EncodeCerts([]*x509.Certificate{inter}), []byte(keyPEM), nil, now); err == nil || !strings.Contains(err.Error(), "ca.crt") {
		t.Fatalf("intermediate without ca.crt: %v, want an error naming ca.crt", err)
	}
	other, err := ca.NewRootSigner(td, time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ca.ParseSigner(ca.EncodeCerts([]*x509.Certificate{inter}), []byte(keyPEM), ca.EncodeCerts([]*x509.Certificate{other.Cert}), now); err == nil {
		t.Fatal("accepted an anchor that the certificate does not chain to")
	}
	s, _, err := ca.ParseSigner(ca.EncodeCerts([]*x509.Certificate{inter}), []byte(keyPEM), ca.EncodeCerts([]*x509.Certificate{root.Cert}), now)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: s})
	if err != nil {
		t.Fatal(err)
	}
	iss, err := a.Sign(spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/web"), p256(t).Public())
	if err != nil {
		t.Fatal(err)
	}
	if len(iss.Chain) != 2 || !iss.Chain[1].Equal(inter) {
		t.Fatalf("chain has %d certificates, want leaf + intermediate", len(iss.Chain))
	}
	if _, _, err := x509svid.Verify(iss.Chain, x509bundle.FromX509Authorities(td, iss.Bundle)); err != nil {
		t.Fatalf("SVID from intermediate does not verify against the root: %v", err)
	}
	// A key that does not match the certificate is refused.
	if _, _, err := ca.ParseSigner(ca.EncodeCerts([]*x509.Certificate{inter}), pemKey(t, p256(t)), ca.EncodeCerts([]*x509.Certificate{root.Cert}), now); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched key: %v", err)
	}
}

func pemKey(t *testing.T, k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return []byte("-----BEGIN PRIVATE KEY-----\n" + base64.StdEncoding.EncodeToString(der) + "\n-----END PRIVATE KEY-----\n")
}

func FuzzParseSignRequest(f *testing.F) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	good, _ := json.Marshal(identity.SignRequest{SPIFFEID: "spiffe://cluster.local/ns/app/sa/web", CSR: csr})
	f.Add(good)
	f.Add([]byte(`{"spiffe_id":"spiffe://cluster.local/ns/a/sa/b","csr":"AAAA"}`))
	f.Add([]byte(`{"spiffe_id":"spiffe://cluster.local/ns/a/sa/b/../c"}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, ref := ca.ParseSignRequest(b, td)
		if (req == nil) == (ref == nil) {
			t.Fatalf("want exactly one of request and refusal: %v %v", req, ref)
		}
		if req != nil {
			if req.ID.TrustDomain() != td || req.CSR.CheckSignature() != nil {
				t.Fatalf("accepted an unchecked request %v", req.ID)
			}
			if w, err := identity.WorkloadOf(req.ID); err != nil || w != req.Workload {
				t.Fatalf("inconsistent workload %v %v", w, err)
			}
		}
	})
}

// BenchmarkIssue measures the CA's whole decision and signing path for one
// request (parse JSON, check CSR, authenticate, pod check, sign), one core.
func BenchmarkIssue(b *testing.B) {
	authn := &identitytest.Authn{Callers: map[string]ca.Caller{"t": {User: "agent", Node: "n"}}}
	pods := &identitytest.Pods{}
	pods.Put("n", identity.Workload{Namespace: "app", ServiceAccount: "web"}, "web-1")
	root, _ := ca.NewRootSigner(td, time.Hour*24, time.Now())
	a, _ := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: root})
	srv, err := ca.NewServer(ca.ServerConfig{Authority: a, Authn: authn, Pods: pods,
		ServingID: spiffeid.RequireFromString("spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-ca"),
		Log:       slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	req := body(b, "spiffe://cluster.local/ns/app/sa/web", csrFor(b, p256(b), nil))
	b.ReportAllocs()
	cpu0 := identitytest.CPUTime()
	for b.Loop() {
		if _, ref := srv.Sign(context.Background(), "t", req); ref != nil {
			b.Fatal(ref)
		}
	}
	// Per core: SVIDs per second of CPU time, independent of machine load.
	b.ReportMetric(float64(b.N)/(identitytest.CPUTime()-cpu0).Seconds(), "svids/s/core")
}
