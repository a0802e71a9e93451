package k8s_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
	"github.com/nodemesh/nodemesh/identity/identitytest"
	"github.com/nodemesh/nodemesh/identity/k8s"
	"github.com/nodemesh/nodemesh/identity/svid"
	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

const agentNS, agentSA = "nodemesh-system", "nodemesh-agent"

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// One API server serves every lab test of the package.
var shared struct {
	once sync.Once
	s    *apiserver.Server
	dir  string
	err  error
}

func TestMain(m *testing.M) {
	identitytest.MainWithCleanup(m, func() {
		if shared.s != nil {
			_ = shared.s.Stop()
		}
		if shared.dir != "" {
			_ = os.RemoveAll(shared.dir)
		}
	})
}

func labServer(t *testing.T) *apiserver.Server {
	t.Helper()
	shared.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		var bin string
		if bin, shared.err = apiserver.Binary(ctx); shared.err != nil {
			shared.err = fmt.Errorf("kube-apiserver unavailable: %w", shared.err)
			return
		}
		if shared.dir, shared.err = os.MkdirTemp("", "nmtid-apiserver-"); shared.err != nil {
			return
		}
		shared.s, shared.err = apiserver.Start(ctx, apiserver.Config{Dir: shared.dir, Binary: bin})
	})
	if shared.err != nil {
		if strings.Contains(shared.err.Error(), "unavailable") || strings.Contains(shared.err.Error(), "etcd") {
			privtest.Skip(t, shared.err.Error())
		}
		t.Fatal(shared.err)
	}
	return shared.s
}

// cluster is the Kubernetes side of a test: two nodes, an agent pod on
// each, an intruder pod (another service account) on node A, and workload
// pods, all distinct per test prefix so tests share one API server.
type cluster struct {
	s              *apiserver.Server
	c              kubernetes.Interface
	app            string // application namespace
	nodeA, nodeB   string
	agentA, agentB *corev1.Pod
	intruderA      *corev1.Pod
}

func ignoreExists(t *testing.T, err error) {
	t.Helper()
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

func newCluster(t *testing.T, prefix string) *cluster {
	s := labServer(t)
	ctx := context.Background()
	cl := &cluster{s: s, c: s.Client, app: prefix + "-app", nodeA: prefix + "-node-a", nodeB: prefix + "-node-b"}
	for _, ns := range []string{agentNS, cl.app} {
		_, err := cl.c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		ignoreExists(t, err)
	}
	for _, sa := range [][2]string{{agentNS, agentSA}, {agentNS, "intruder"}, {cl.app, "web"}, {cl.app, "db"}, {cl.app, "api"}, {cl.app, "batch"}} {
		_, err := cl.c.CoreV1().ServiceAccounts(sa[0]).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa[1]}}, metav1.CreateOptions{})
		ignoreExists(t, err)
	}
	for _, n := range []string{cl.nodeA, cl.nodeB} {
		_, err := cl.c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{})
		ignoreExists(t, err)
	}
	cl.agentA = cl.pod(t, agentNS, prefix+"-agent-a", agentSA, cl.nodeA, corev1.PodRunning)
	cl.agentB = cl.pod(t, agentNS, prefix+"-agent-b", agentSA, cl.nodeB, corev1.PodRunning)
	cl.intruderA = cl.pod(t, agentNS, prefix+"-intruder-a", "intruder", cl.nodeA, corev1.PodRunning)
	return cl
}

// pod creates a pod scheduled on node with the given phase, as the
// scheduler and kubelet would.
func (cl *cluster) pod(t *testing.T, ns, name, sa, node string, phase corev1.PodPhase) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	p, err := cl.c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, NodeName: node,
			Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/none"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", ns, name, err)
	}
	p.Status.Phase = phase
	if p, err = cl.c.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("setting pod %s/%s %s: %v", ns, name, phase, err)
	}
	return p
}

func (cl *cluster) deletePod(t *testing.T, ns, name string) {
	t.Helper()
	zero := int64(0)
	if err := cl.c.CoreV1().Pods(ns).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatalf("deleting pod %s/%s: %v", ns, name, err)
	}
}

// token requests a service-account token like the kubelet's projected
// volume: audience aud, bound to pod (if not nil).
func (cl *cluster) token(t *testing.T, sa string, pod *corev1.Pod, aud string) string {
	t.Helper()
	exp := int64(3600)
	spec := authnv1.TokenRequestSpec{Audiences: []string{aud}, ExpirationSeconds: &exp}
	if pod != nil {
		spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := cl.c.CoreV1().ServiceAccounts(agentNS).CreateToken(context.Background(), sa, &authnv1.TokenRequest{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s: %v", sa, err)
	}
	return tr.Status.Token
}

// resign rewrites a real token's claims with edit and signs it with key
// (ES256). With the API server's own key it is a genuine token.
func resign(t *testing.T, token string, key *ecdsa.PrivateKey, edit func(map[string]any)) string {
	t.Helper()
	parts := strings.Split(token, ".")
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	claims := map[string]any{}
	if err := json.Unmarshal(raw, &claims); err != nil {
		t.Fatal(err)
	}
	edit(claims)
	raw, err = json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	signing := parts[0] + "." + base64.RawURLEncoding.EncodeToString(raw)
	h := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, h[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

func apiServerSigningKey(t *testing.T, s *apiserver.Server) *ecdsa.PrivateKey {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.Dir, "sa.key"))
	if err != nil {
		t.Fatal(err)
	}
	k, err := ca.ParseKey(b)
	if err != nil {
		t.Fatal(err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		t.Fatalf("API server signing key is %T, want ECDSA", k)
	}
	return ek
}

// startCA runs the CA in-process against the real API server: TokenReview
// authentication, pod lookups, bundle published in the ConfigMap.
func startCA(t *testing.T, cl *cluster, ttl time.Duration) *identitytest.CA {
	t.Helper()
	authn, err := ca.NewKubeAuthenticator(ca.KubeAuthenticatorConfig{Client: cl.c, AgentNamespace: agentNS, AgentServiceAccount: agentSA})
	if err != nil {
		t.Fatal(err)
	}
	c := identitytest.NewCA(t, identitytest.CAOptions{Authn: authn, Pods: ca.KubePods{Client: cl.c}, TTL: ttl, Backdate: time.Second})
	if err := ca.PublishBundle(context.Background(), cl.c, agentNS, identity.BundleConfigMap, c.Authority.Bundle()); err != nil {
		t.Fatal(err)
	}
	return c
}

func csr(t *testing.T) []byte {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestLabIssuanceAndRefusals: the CA signs for a pod on the caller's node,
// and refuses every other case with its specific code and an audit line.
func TestLabIssuanceAndRefusals(t *testing.T) {
	cl := newCluster(t, "nmt1")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl.pod(t, cl.app, "web-1", "web", cl.nodeA, corev1.PodRunning)
	cl.pod(t, cl.app, "db-1", "db", cl.nodeB, corev1.PodRunning)
	// Starting (the CNI plugin enrolls pods before they run): served.
	cl.pod(t, cl.app, "api-1", "api", cl.nodeA, corev1.PodPending)
	// Finished: refused.
	cl.pod(t, cl.app, "batch-1", "batch", cl.nodeA, corev1.PodSucceeded)
	c := startCA(t, cl, time.Hour)

	tokA := cl.token(t, agentSA, cl.agentA, identity.Audience)
	// What the API server tells the CA about the token.
	tr, err := cl.c.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: tokA, Audiences: []string{identity.Audience}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("TokenReview of a bound agent token: user %q extra %v", tr.Status.User.Username, tr.Status.User.Extra)

	webID := "spiffe://cluster.local/ns/" + cl.app + "/sa/web"
	dbID := "spiffe://cluster.local/ns/" + cl.app + "/sa/db"
	apiID := "spiffe://cluster.local/ns/" + cl.app + "/sa/api"
	batchID := "spiffe://cluster.local/ns/" + cl.app + "/sa/batch"
	sa := apiServerSigningKey(t, cl.s)
	forgeKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	expired := resign(t, tokA, sa, func(c map[string]any) {
		now := time.Now().Unix()
		c["iat"], c["nbf"], c["exp"] = now-7200, now-7200, now-3600
	})
	forged := resign(t, tokA, forgeKey, func(map[string]any) {})
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	rsaCSR, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, rsaKey)
	badSig := csr(t)
	badSig[len(badSig)-3] ^= 0x55
	// A token whose agent pod has been deleted (node compromised, pod gone).
	gonePod := cl.pod(t, agentNS, "nmt1-agent-gone", agentSA, cl.nodeA, corev1.PodRunning)
	goneTok := cl.token(t, agentSA, gonePod, identity.Audience)
	cl.deletePod(t, agentNS, gonePod.Name)

	for _, tc := range []struct {
		name, token, id string
		csr             []byte
		code            identity.Code // "" = issued
		node            string        // expected in the audit line
	}{
		{"pod on caller's node", tokA, webID, csr(t), "", cl.nodeA},
		{"pod on another node", tokA, dbID, csr(t), identity.CodeNoWorkload, cl.nodeA},
		{"pod starting (Pending)", tokA, apiID, csr(t), "", cl.nodeA},
		{"pod finished", tokA, batchID, csr(t), identity.CodeNoWorkload, cl.nodeA},
		{"other service account", cl.token(t, "intruder", cl.intruderA, identity.Audience), webID, csr(t), identity.CodeNotAgent, ""},
		{"wrong audience", cl.token(t, agentSA, cl.agentA, "https://kubernetes.default.svc"), webID, csr(t), identity.CodeTokenAudience, ""},
		{"token bound to nothing", cl.token(t, agentSA, nil, identity.Audience), webID, csr(t), identity.CodeTokenNotBound, ""},
		{"expired token", expired, webID, csr(t), identity.CodeTokenExpired, ""},
		{"forged token", forged, webID, csr(t), identity.CodeTokenInvalid, ""},
		{"token of a deleted pod", goneTok, webID, csr(t), identity.CodeTokenInvalid, ""},
		{"no token", "", webID, csr(t), identity.CodeUnauthenticated, ""},
		{"other trust domain", tokA, "spiffe://evil.example/ns/" + cl.app + "/sa/web", csr(t), identity.CodeWrongTrustDomain, cl.nodeA},
		{"weak key", tokA, webID, rsaCSR, identity.CodeWeakKey, cl.nodeA},
		{"CSR signature", tokA, webID, badSig, identity.CodeBadCSRSignature, cl.nodeA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := tc.token
			client, err := svid.NewClient(svid.ClientConfig{URL: c.URL, CAID: c.ID, Bundle: bundleSource(c),
				Token: func(context.Context) (string, error) { return tok, nil }})
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			// svid.Client takes a parsed ID; other-trust-domain IDs parse fine.
			id := spiffeid.RequireFromString(tc.id)
			signed, err := client.Sign(ctx, id, tc.csr)
			if tc.code == "" {
				if err != nil {
					t.Fatal(err)
				}
				leaf := signed.Chain[0]
				if len(leaf.URIs) != 1 || leaf.URIs[0].String() != tc.id {
					t.Fatalf("SVID URIs %v", leaf.URIs)
				}
				return
			}
			var re *identity.RefusedError
			if !errors.As(err, &re) || re.Code != tc.code {
				t.Fatalf("got %v, want refusal %s", err, tc.code)
			}
			t.Logf("refused as expected: %v", re)
			line := findAudit(t, c.Log.String(), tc.code, tc.id)
			if tc.node != "" && line["node"] != tc.node {
				t.Errorf("audit line node %v, want %s: %v", line["node"], tc.node, line)
			}
			if tc.code == identity.CodeNotAgent && line["caller"] != "system:serviceaccount:"+agentNS+":intruder" {
				t.Errorf("audit line does not name the intruder: %v", line)
			}
		})
	}
}

func bundleSource(c *identitytest.CA) *x509BundleAdapter { return &x509BundleAdapter{c} }

func findAudit(t *testing.T, logs string, code identity.Code, id string) map[string]any {
	t.Helper()
	for _, l := range strings.Split(logs, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) != nil {
			continue
		}
		if m["msg"] == "audit" && m["decision"] == "refused" && m["reason"] == string(code) && m["spiffe_id"] == id {
			return m
		}
	}
	t.Fatalf("no audit line for %s %s in:\n%s", code, id, logs)
	return nil
}

// echoServer accepts mTLS connections as id and echoes for the client
// allowed only.
func echoServer(t *testing.T, p identity.Provider, id, allowed spiffeid.ID) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	tl := tls.NewListener(ln, identitytest.ServerTLS(t, p, id))
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
				tc := c.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				if peer, err := hbone.PeerID(tc.ConnectionState()); err != nil || peer != allowed {
					return
				}
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func dialEcho(ctx context.Context, addr string, cfg *tls.Config) (*tls.Conn, error) {
	d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*tls.Conn)
	if err := ping(tc); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

func ping(c *tls.Conn) error {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{42}); err != nil {
		return err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if b[0] != 42 {
		return errors.New("echo mismatch")
	}
	return nil
}

type agent struct {
	m      *svid.Manager
	client *svid.Client
}

// startAgent runs what the node agent runs for identity: the SVID manager,
// its CA client with a bound projected token, the pod informer for the
// node and the bundle ConfigMap informer.
func startAgent(t *testing.T, cl *cluster, c *identitytest.CA, node string, agentPod *corev1.Pod, log *slog.Logger) *agent {
	t.Helper()
	tok := cl.token(t, agentSA, agentPod, identity.Audience)
	m, client, err := svid.NewWithCA(svid.Config{
		TrustDomain: td, Log: log.With("node", node),
		// Renew at 25-30% of the lifetime so at least 70% is left when
		// renewal starts: the SVIDs then outlive a CA outage of more than
		// half a TTL whenever it starts, with room for a loaded machine.
		// BackoffMax is short to make recovery quick.
		RefreshFraction: 0.3, Jitter: 0.05,
		BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second,
	}, svid.ClientConfig{URL: c.URL, CAID: c.ID, Token: func(context.Context) (string, error) { return tok, nil }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	run := func(f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				t.Errorf("agent %s: %v", node, err)
			}
		}()
	}
	api := apiclienttest.New(t, cl.s.REST)
	run(func() error { return m.Run(ctx) })
	run(func() error {
		return k8s.RunBundleWatcher(ctx, api, agentNS, identity.BundleConfigMap, m.SetBundle, log)
	})
	run(func() error {
		return k8s.RunPodWatcher(ctx, k8s.PodWatcherConfig{Client: api, Node: node, TrustDomain: td, Target: m, Log: log})
	})
	t.Cleanup(func() { cancel(); wg.Wait(); client.Close() })
	return &agent{m: m, client: client}
}

// TestLabRotationAndOutages drives two agents (node A runs web, node B runs
// db) with informer-driven SVID managers against the CA and the real API
// server, under a short TTL, with handshakes web -> db every 100 ms:
//  1. SVIDs renew several times and the root rotates (overlap window):
//     no handshake fails, and a connection opened before stays usable;
//  2. the CA is down for longer than half a TTL: no handshake fails;
//  3. the CA is down past expiry: handshakes fail closed; the CA comes
//     back: handshakes recover;
//  4. the last web pod leaves node A: its identity is dropped.
func TestLabRotationAndOutages(t *testing.T) {
	const ttl = 8 * time.Second
	cl := newCluster(t, "nmt2")
	webPod := cl.pod(t, cl.app, "web-1", "web", cl.nodeA, corev1.PodRunning)
	cl.pod(t, cl.app, "db-1", "db", cl.nodeB, corev1.PodRunning)
	c := startCA(t, cl, ttl)
	log := slog.New(slog.NewTextHandler(&identitytest.SyncBuffer{}, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	a := startAgent(t, cl, c, cl.nodeA, cl.agentA, log)
	b := startAgent(t, cl, c, cl.nodeB, cl.agentB, log)
	webID := spiffeid.RequireFromString("spiffe://cluster.local/ns/" + cl.app + "/sa/web")
	dbID := spiffeid.RequireFromString("spiffe://cluster.local/ns/" + cl.app + "/sa/db")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The pod informers, not the test, ask for these identities.
	waitfor.NoError(t, 20*time.Second, "web SVID on node A", func() error { return ready(a.m, webID) })
	waitfor.NoError(t, 20*time.Second, "db SVID on node B", func() error { return ready(b.m, dbID) })
	if err := ready(a.m, dbID); err == nil {
		t.Fatal("node A holds db's SVID although db runs only on node B")
	}

	addr := echoServer(t, b.m, dbID, webID)
	clientCfg := identitytest.ClientTLS(t, a.m, webID, dbID)
	live, err := dialEcho(ctx, addr, clientCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()

	// Traffic: a fresh handshake every 100 ms.
	type probe struct {
		at  time.Time
		err error
	}
	var mu sync.Mutex
	var probes []probe
	var serials = map[string]bool{}
	trafficCtx, stopTraffic := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-trafficCtx.Done():
				return
			case <-tick.C:
			}
			conn, err := dialEcho(trafficCtx, addr, clientCfg)
			if trafficCtx.Err() != nil {
				return
			}
			mu.Lock()
			probes = append(probes, probe{time.Now(), err})
			if err == nil {
				serials[conn.ConnectionState().PeerCertificates[0].SerialNumber.String()] = true
				conn.Close()
			}
			mu.Unlock()
		}
	}()
	failures := func(since time.Time) (n, total int, first error) {
		mu.Lock()
		defer mu.Unlock()
		for _, p := range probes {
			if p.at.Before(since) {
				continue
			}
			total++
			if p.err != nil {
				n++
				if first == nil {
					first = p.err
				}
			}
		}
		return n, total, first
	}

	// 1. Root rotation under traffic, with renewals.
	start := time.Now()
	oldRoot := c.Authority.ActiveSigner().Root
	next, err := ca.NewRootSigner(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	err = c.Authority.Rotate(ctx, next, ca.RotationConfig{
		Propagation: 2 * time.Second, Margin: time.Second, Log: log,
		Persist: func(ctx context.Context, _ *ca.Signer, roots []*x509.Certificate) error {
			return ca.PublishBundle(ctx, cl.c, agentNS, identity.BundleConfigMap, roots)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	// Agents reloaded the one-root bundle from the ConfigMap, and their
	// SVIDs now chain to the new root.
	for _, x := range []struct {
		m  *svid.Manager
		id spiffeid.ID
	}{{a.m, webID}, {b.m, dbID}} {
		waitfor.NoError(t, 10*time.Second, "agents on the new root", func() error {
			bnd, err := x.m.GetX509BundleForTrustDomain(td)
			if err != nil {
				return err
			}
			if auth := bnd.X509Authorities(); len(auth) != 1 || !auth[0].Equal(next.Root) {
				return fmt.Errorf("bundle has %d roots", len(auth))
			}
			s, err := x.m.SVIDSource(x.id).GetX509SVID()
			if err != nil {
				return err
			}
			if err := s.Certificates[0].CheckSignatureFrom(next.Root); err != nil {
				return fmt.Errorf("SVID not yet from the new root: %w", err)
			}
			return nil
		})
	}
	if n, total, first := failures(start); n > 0 || total < 50 {
		t.Fatalf("during rotation %d of %d handshakes failed (first: %v)", n, total, first)
	}
	mu.Lock()
	renewals := len(serials)
	mu.Unlock()
	if renewals < 3 {
		t.Errorf("db presented %d distinct SVIDs during %s, want renewals", renewals, time.Since(start).Round(time.Second))
	}
	if err := ping(live); err != nil {
		t.Fatalf("connection opened before the rotation broke: %v", err)
	}
	t.Logf("rotation from %q: %s, %d SVIDs seen, 0 failed handshakes", oldRoot.Subject.CommonName, time.Since(start).Round(time.Millisecond), renewals)

	// 2. CA down for more than half a TTL.
	down := time.Now()
	c.Stop()
	time.Sleep(time.Until(down.Add(ttl/2 + 300*time.Millisecond)))
	if err := c.Start(""); err != nil {
		t.Fatal(err)
	}
	outage := time.Since(down)
	if n, total, first := failures(down); n > 0 || total < 20 {
		t.Fatalf("with the CA down %s: %d of %d handshakes failed (first: %v)", outage, n, total, first)
	}
	t.Logf("CA down %s (TTL %s): 0 failed handshakes", outage.Round(time.Millisecond), ttl)
	stopTraffic()
	wg.Wait()

	// 3. CA down past expiry: fail closed, then recover.
	c.Stop()
	waitfor.NoError(t, 2*ttl, "web's SVID to expire", func() error {
		if _, err := a.m.SVIDSource(webID).GetX509SVID(); errors.Is(err, svid.ErrNoSVID) {
			return nil
		}
		return errors.New("still valid")
	})
	if conn, err := dialEcho(ctx, addr, clientCfg); err == nil {
		conn.Close()
		t.Fatal("handshake succeeded with an expired SVID")
	} else {
		t.Logf("fail closed as expected: %v", err)
	}
	if err := c.Start(""); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	waitfor.NoError(t, 20*time.Second, "handshakes after the CA returns", func() error {
		conn, err := dialEcho(ctx, addr, clientCfg)
		if err == nil {
			conn.Close()
		}
		return err
	})
	t.Logf("recovered %s after the CA returned", time.Since(back).Round(time.Millisecond))

	// 4. The last web pod leaves node A: the identity is dropped.
	cl.deletePod(t, cl.app, webPod.Name)
	waitfor.NoError(t, 20*time.Second, "web dropped on node A", func() error {
		if _, err := a.m.SVIDSource(webID).GetX509SVID(); errors.Is(err, svid.ErrNoSVID) {
			return nil
		}
		return errors.New("web SVID still held")
	})
}

func ready(m *svid.Manager, id spiffeid.ID) error {
	_, err := m.SVIDSource(id).GetX509SVID()
	return err
}

// x509BundleAdapter serves the CA's current bundle, as an agent with the
// ConfigMap loaded would have it.
type x509BundleAdapter struct{ c *identitytest.CA }

func (x *x509BundleAdapter) GetX509BundleForTrustDomain(d spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if d != td {
		return nil, fmt.Errorf("no bundle for %s", d)
	}
	return x509bundle.FromX509Authorities(td, x.c.Authority.Bundle()), nil
}
