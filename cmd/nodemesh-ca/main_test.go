package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
	"github.com/nodemesh/nodemesh/identity/k8s"
	"github.com/nodemesh/nodemesh/identity/svid"
	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // substring of the error; "" = valid
	}{
		{nil, ""},
		{[]string{"--trust-domain", "Bad Domain"}, "--trust-domain"},
		{[]string{"--svid-ttl", "10s"}, "--svid-ttl"},
		{[]string{"--agent-service-account", "nodemesh-agent"}, "--agent-service-account"},
		{[]string{"--root-ttl", "2h"}, "--root-ttl"},
		{[]string{"--rotate-at", "1.5"}, "--rotate-at"},
		{[]string{"--listen", "15012"}, "--listen"},
		{[]string{"--log-level", "loud"}, "--log-level"},
		{[]string{"--service-account", "Not_Valid"}, "--service-account"},
	} {
		cfg, err := parseFlags(tc.args)
		if err == nil {
			err = cfg.Validate()
		}
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v", tc.args, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: error %v, want one naming %s", tc.args, err, tc.want)
		}
	}
	if _, err := parseFlags([]string{"extra"}); err == nil {
		t.Error("accepted a positional argument")
	}
}

// TestLabCABinary runs the binary's run() against the real API server: it
// generates and stores a root, publishes the bundle, serves an agent that
// verifies it with the published bundle, stops gracefully, and keeps its
// root across a restart.
func TestLabCABinary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := apiserver.Binary(ctx)
	if err != nil {
		privtest.Skip(t, "kube-apiserver unavailable: "+err.Error())
	}
	dir, err := os.MkdirTemp("", "nmtca-apiserver-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	s, err := apiserver.Start(ctx, apiserver.Config{Dir: dir, Binary: bin})
	if err != nil {
		if strings.Contains(err.Error(), "etcd") {
			privtest.Skip(t, err.Error())
		}
		t.Fatal(err)
	}
	defer s.Stop()
	c := s.Client
	mk := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err = c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "nodemesh-system"}}, metav1.CreateOptions{})
	mk(err)
	_, err = c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{})
	mk(err)
	for _, sa := range [][2]string{{"nodemesh-system", "nodemesh-agent"}, {"shop", "cart"}} {
		_, err = c.CoreV1().ServiceAccounts(sa[0]).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa[1]}}, metav1.CreateOptions{})
		mk(err)
	}
	_, err = c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "worker-1"}}, metav1.CreateOptions{})
	mk(err)
	pod := func(ns, name, sa string) *corev1.Pod {
		p, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.PodSpec{ServiceAccountName: sa, NodeName: "worker-1", Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/x"}}},
		}, metav1.CreateOptions{})
		mk(err)
		p.Status.Phase = corev1.PodRunning
		p, err = c.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		mk(err)
		return p
	}
	agentPod := pod("nodemesh-system", "agent-1", "nodemesh-agent")
	pod("shop", "cart-1", "cart")

	cfg, err := parseFlags([]string{"--listen", "127.0.0.1:0", "--namespace", "nodemesh-system"})
	mk(err)
	mk(cfg.Validate())
	var logs bytes.Buffer
	var logMu sync.Mutex
	log := slog.New(slog.NewJSONHandler(lockedWriter{&logs, &logMu}, nil))
	start := func() (addr string, stop func() error) {
		rctx, rcancel := context.WithCancel(ctx)
		ready := make(chan string, 1)
		errc := make(chan error, 1)
		go func() { errc <- run(rctx, cfg, s.REST, ready, log) }()
		select {
		case addr = <-ready:
		case err := <-errc:
			rcancel()
			t.Fatalf("CA exited: %v", err)
		}
		return addr, func() error { rcancel(); return <-errc }
	}
	addr, stop := start()

	// The agent side: bundle from the ConfigMap, token bound to its pod.
	exp := int64(3600)
	tr, err := c.CoreV1().ServiceAccounts("nodemesh-system").CreateToken(ctx, "nodemesh-agent", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{identity.Audience}, ExpirationSeconds: &exp,
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: agentPod.Name, UID: agentPod.UID},
	}}, metav1.CreateOptions{})
	mk(err)
	var bundle []*x509.Certificate
	deadline := time.Now().Add(30 * time.Second)
	for {
		cm, err := c.CoreV1().ConfigMaps("nodemesh-system").Get(ctx, identity.BundleConfigMap, metav1.GetOptions{})
		if err == nil {
			if bundle, err = k8s.ParseBundle([]byte(cm.Data[identity.BundleKey])); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("bundle ConfigMap not published: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	m, client, err := svid.NewWithCA(svid.Config{TrustDomain: td, Log: log}, svid.ClientConfig{
		URL: "https://" + addr, CAID: spiffeid.RequireFromString("spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-ca"),
		Token: func(context.Context) (string, error) { return tr.Status.Token, nil },
	})
	mk(err)
	defer client.Close()
	mk(m.SetBundle(bundle))
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	cart := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	signed, err := client.Sign(ctx, cart, csr)
	mk(err)
	if len(signed.Chain) != 1 || signed.Chain[0].URIs[0].String() != cart.String() {
		t.Fatalf("unexpected chain %v", signed.Chain)
	}
	if err := stop(); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
	sec, err := c.CoreV1().Secrets("nodemesh-system").Get(ctx, "nodemesh-ca-root", metav1.GetOptions{})
	mk(err)
	if len(sec.Data["tls.key"]) == 0 {
		t.Fatal("root key not stored")
	}

	// Restart: same root, so the bundle agents hold stays valid.
	addr, stop = start()
	client2, err := svid.NewClient(svid.ClientConfig{URL: "https://" + addr, CAID: spiffeid.RequireFromString("spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-ca"),
		Bundle: m, Token: func(context.Context) (string, error) { return tr.Status.Token, nil }})
	mk(err)
	defer client2.Close()
	if _, err := client2.Sign(ctx, cart, csr); err != nil {
		t.Fatalf("after restart, with the old bundle: %v", err)
	}
	mk(stop())
	logMu.Lock()
	if !strings.Contains(logs.String(), `"decision":"issued"`) {
		t.Errorf("no audit line in the CA log:\n%s", logs.String())
	}
	logMu.Unlock()

	// The real main as a process: serves, and exits 0 on SIGTERM.
	cmd := exec.CommandContext(ctx, os.Args[0], "--listen", "127.0.0.1:0", "--namespace", "nodemesh-system", "--kubeconfig", s.Kubeconfig)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	stderr, err := cmd.StderrPipe()
	mk(err)
	mk(cmd.Start())
	sc := bufio.NewScanner(stderr)
	var out strings.Builder
	serving := false
	for !serving && sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		serving = strings.Contains(sc.Text(), "nodemesh-ca serving")
	}
	if !serving {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("nodemesh-ca process did not start serving:\n%s", out.String())
	}
	mk(cmd.Process.Signal(syscall.SIGTERM))
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
	}
	if err := cmd.Wait(); err != nil || !strings.Contains(out.String(), "nodemesh-ca stopped") {
		t.Fatalf("after SIGTERM: %v\n%s", err, out.String())
	}
}

// runMainEnv makes the test binary run main(), so the lab test can run the
// real binary as a process without building it.
const runMainEnv = "NODEMESH_CA_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Args = append([]string{"nodemesh-ca"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type lockedWriter struct {
	b  *bytes.Buffer
	mu *sync.Mutex
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// TestFollowProvided: a renewed cert-manager Secret (new intermediate, same
// root) is picked up without a restart.
func TestFollowProvided(t *testing.T) {
	ctx := context.Background()
	now := time.Now()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	root, err := ca.NewRootSigner(td, 48*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	secret := func(name string) *corev1.Secret {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		}, root.Cert, key.Public(), root.Key)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		k, _ := x509.MarshalPKCS8PrivateKey(key)
		return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "issuer", Namespace: "nodemesh-system"}, Data: map[string][]byte{
			"tls.crt": ca.EncodeCerts([]*x509.Certificate{c}),
			"tls.key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k}),
			"ca.crt":  ca.EncodeCerts([]*x509.Certificate{root.Cert}),
		}}
	}
	kc := fake.NewClientset(secret("first"))
	cfg, err := parseFlags([]string{"--ca-secret", "issuer", "--namespace", "nodemesh-system"})
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s, extra, err := ca.LoadProvidedSigner(ctx, kc, "nodemesh-system", "issuer", now)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: s, ExtraRoots: extra})
	if err != nil {
		t.Fatal(err)
	}
	var published int
	rot := ca.RotationConfig{Propagation: time.Millisecond, Log: slog.New(slog.DiscardHandler),
		Persist: func(context.Context, *ca.Signer, []*x509.Certificate) error { published++; return nil }}
	if err := checkProvided(ctx, cfg, kc, a, rot); err != nil || published != 0 {
		t.Fatalf("unchanged Secret: %v, %d publications", err, published)
	}
	if _, err := kc.CoreV1().Secrets("nodemesh-system").Update(ctx, secret("second"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := checkProvided(ctx, cfg, kc, a, rot); err != nil {
		t.Fatal(err)
	}
	if got := a.ActiveSigner().Cert.Subject.CommonName; got != "second" {
		t.Fatalf("signing with %q after the Secret was renewed", got)
	}
	if len(a.Bundle()) != 1 || !a.Bundle()[0].Equal(root.Cert) {
		t.Fatalf("bundle changed although the root did not")
	}
	// A broken Secret keeps the current signer.
	bad := secret("third")
	bad.Data["tls.key"] = []byte("junk")
	if _, err := kc.CoreV1().Secrets("nodemesh-system").Update(ctx, bad, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := checkProvided(ctx, cfg, kc, a, rot); err == nil || !strings.Contains(err.Error(), "still signing") {
		t.Fatalf("broken Secret: %v", err)
	}
	if a.ActiveSigner().Cert.Subject.CommonName != "second" {
		t.Fatal("signer replaced by a broken Secret")
	}
}
