package manifests_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	agentk8s "github.com/nodemesh/nodemesh/agent/k8s"
	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/identity"
	idk8s "github.com/nodemesh/nodemesh/identity/k8s"
	"github.com/nodemesh/nodemesh/identity/svid"
	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/manifests"
)

const fieldManager = "nodemesh-install-check"

// cluster is the lab API server with the clients the test needs.
type cluster struct {
	srv    *apiserver.Server
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func startCluster(ctx context.Context, t *testing.T) *cluster {
	t.Helper()
	bin, err := apiserver.Binary(ctx)
	if err != nil {
		privtest.Skip(t, "kube-apiserver unavailable: "+err.Error())
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		privtest.Skip(t, "etcd not installed (apt-get install etcd-server)")
	}
	srv, err := apiserver.Start(ctx, apiserver.Config{Dir: t.TempDir(), Binary: bin})
	if err != nil {
		t.Fatalf("starting the lab API server: %v", err)
	}
	t.Cleanup(func() { _ = srv.Stop() })
	return clusterOf(t, srv)
}

// clusterOf wraps a running API server.
func clusterOf(t *testing.T, srv *apiserver.Server) *cluster {
	t.Helper()
	// Quiet: the namespace warns about the "restricted" level on purpose.
	quiet := rest.CopyConfig(srv.REST)
	quiet.WarningHandler = rest.NoWarnings{}
	dyn, err := dynamic.NewForConfig(quiet)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(srv.REST)
	if err != nil {
		t.Fatal(err)
	}
	return &cluster{srv: srv, dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))}
}

// apply server-side applies obj, as `kubectl apply --server-side` does.
func (c *cluster) apply(ctx context.Context, obj *unstructured.Unstructured, dryRun bool) error {
	gvk := obj.GroupVersionKind()
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	// A CRD can be Established before the API server's discovery lists
	// its kind: refresh the mapping until it does (bounded).
	for deadline := time.Now().Add(30 * time.Second); meta.IsNoMatchError(err) && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		c.mapper.Reset()
		m, err = c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	}
	if err != nil {
		return fmt.Errorf("mapping %s: %w", gvk, err)
	}
	var ri dynamic.ResourceInterface = c.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		ri = c.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
	}
	opts := metav1.ApplyOptions{FieldManager: fieldManager, Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	if _, err := ri.Apply(ctx, obj.GetName(), obj, opts); err != nil {
		return fmt.Errorf("applying %s %s/%s (dry run %v): %w", obj.GetKind(), obj.GetNamespace(), obj.GetName(), dryRun, err)
	}
	return nil
}

func clusterScoped(o *unstructured.Unstructured) bool { return o.GetNamespace() == "" }

// TestLabInstall is `make manifests-check`: it installs the manifests into
// the lab's real kube-apiserver (Node,RBAC authorization, service-account
// tokens) and proves that the RBAC is enough, and no more:
//
//  1. every object of every install (default, lab, production) passes a
//     server-side dry-run apply, after the CRDs are installed and Established;
//  2. the default install is applied;
//  3. with a TokenRequest token of the agent's service account, the
//     agent's informers (every resource it watches) sync and its trust
//     bundle watcher receives the CA's bundle; access reviews show it cannot
//     write pods or read secrets;
//  4. the real nodemesh-ca binary runs with the Deployment's arguments and a
//     kubeconfig carrying the CA service account's token: it creates its
//     root Secret and bundle ConfigMap, authenticates an agent's pod-bound
//     token (TokenReview) and signs an SVID only for a workload running on
//     the agent's node (pod list).
func TestLabInstall(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := startCluster(ctx, t)
	admin := c.srv.Client

	renders := map[string][]*unstructured.Unstructured{}
	for _, dir := range append(slices.Clone(installs), uninstall, meshPolicy) {
		objs, err := manifests.Render(dir)
		if err != nil {
			t.Fatal(err)
		}
		renders[dir] = objs
	}
	def := renders["."]

	// 1. Cluster-scoped objects first (a namespaced dry run needs the
	// namespace to exist), then the namespace and CRDs for real.
	for _, dir := range installs {
		for _, o := range renders[dir] {
			if clusterScoped(o) {
				if err := c.apply(ctx, o, true); err != nil {
					t.Errorf("%s: %v", dir, err)
				}
			}
		}
	}
	var crds []string
	for _, o := range def {
		if o.GetKind() == "Namespace" || o.GetKind() == "CustomResourceDefinition" {
			if err := c.apply(ctx, o, false); err != nil {
				t.Fatal(err)
			}
		}
		if o.GetKind() == "CustomResourceDefinition" {
			crds = append(crds, o.GetName())
		}
	}
	for _, name := range crds {
		waitEstablished(ctx, t, c.dyn, name)
	}
	c.mapper.Reset()
	for _, dir := range append(slices.Clone(installs), uninstall, meshPolicy) {
		for _, o := range renders[dir] {
			if !clusterScoped(o) {
				if err := c.apply(ctx, o, true); err != nil {
					t.Errorf("%s: %v", dir, err)
				}
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// 2. The default install, for real (no controllers run: nothing starts).
	for _, o := range def {
		if err := c.apply(ctx, o, false); err != nil {
			t.Fatal(err)
		}
	}
	checkPodSecurity(ctx, t, c, def)

	// 3. The agent's service account.
	agentToken := token(ctx, t, admin, "nodemesh-agent", nil, nil)
	agentREST := c.srv.ClientFor(agentToken)
	checkAgentAccess(ctx, t, agentREST)
	runAgentInformers(ctx, t, agentREST)
	bundleCh := runAgentWatchers(ctx, t, agentREST)

	// 4. The CA.
	ca := checkCARuns(ctx, t, c, def, bundleCh)

	// 5. The real agent binary with the DaemonSet's arguments.
	runAgentBinary(ctx, t, c, def, ca)
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

func waitEstablished(ctx context.Context, t *testing.T, dyn dynamic.Interface, name string) {
	t.Helper()
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		u, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
		for _, c := range conds {
			m, _ := c.(map[string]any)
			if m["type"] == "Established" && m["status"] == "True" {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("CRD %s not Established: %v", name, err)
	}
}

// checkPodSecurity creates (dry run) the pods the workloads would create:
// the agent's in nodemesh-system (enforce: privileged), and the CA's also
// in a namespace enforcing the "restricted" Pod Security Standard, which it
// must pass.
func checkPodSecurity(ctx context.Context, t *testing.T, c *cluster, def []*unstructured.Unstructured) {
	t.Helper()
	var agentT, caT corev1.PodTemplateSpec
	for _, o := range def {
		switch o.GetKind() {
		case "DaemonSet":
			var ds appsv1.DaemonSet
			mustConvert(t, o, &ds)
			agentT = ds.Spec.Template
		case "Deployment":
			var d appsv1.Deployment
			mustConvert(t, o, &d)
			caT = d.Spec.Template
		}
	}
	dry := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldManager: fieldManager}
	pod := func(ns, name string, tmpl corev1.PodTemplateSpec) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: tmpl.Labels}, Spec: tmpl.Spec}
	}
	if _, err := c.srv.Client.CoreV1().Pods(ns).Create(ctx, pod(ns, "nodemesh-agent-check", agentT), dry); err != nil {
		t.Errorf("agent pod refused in %s: %v", ns, err)
	}
	const restricted = "nmtmanifests-restricted"
	_, err := c.srv.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name: restricted, Labels: map[string]string{"pod-security.kubernetes.io/enforce": "restricted"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: restricted, Name: caT.Spec.ServiceAccountName}}
	if _, err := c.srv.Client.CoreV1().ServiceAccounts(restricted).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.srv.Client.CoreV1().Pods(restricted).Create(ctx, pod(restricted, "nodemesh-ca-check", caT), dry); err != nil {
		t.Errorf("CA pod does not meet the restricted Pod Security Standard: %v", err)
	}
	// The check can fail: the agent pod is far from restricted.
	sa.Name = agentT.Spec.ServiceAccountName
	if _, err := c.srv.Client.CoreV1().ServiceAccounts(restricted).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.srv.Client.CoreV1().Pods(restricted).Create(ctx, pod(restricted, "nodemesh-agent-check", agentT), dry); err == nil {
		t.Error("agent pod passed the restricted Pod Security Standard; the admission check is not working")
	}
}

// token returns a TokenRequest token for service account sa in the
// nodemesh namespace, bound to pod if given.
func token(ctx context.Context, t *testing.T, c kubernetes.Interface, sa string, audiences []string, pod *corev1.Pod) string {
	t.Helper()
	exp := int64(600)
	req := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: &exp}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := c.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s: %v", sa, err)
	}
	return tr.Status.Token
}

// access is one access review: may the caller do verb on resource?
type access struct {
	verb, group, resource, namespace, name string
	want                                   bool
}

func (a access) String() string {
	where := "cluster-wide"
	if a.namespace != "" {
		where = "in " + a.namespace
	}
	r := a.resource
	if a.group != "" {
		r += "." + a.group
	}
	if a.name != "" {
		r += "/" + a.name
	}
	return fmt.Sprintf("%s %s %s", a.verb, r, where)
}

func review(ctx context.Context, t *testing.T, who string, c kubernetes.Interface, checks []access) {
	t.Helper()
	for _, a := range checks {
		r, err := c.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authzv1.SelfSubjectAccessReview{
			Spec: authzv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{
				Verb: a.verb, Group: a.group, Resource: a.resource, Namespace: a.namespace, Name: a.name,
			}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("access review as %s: %v", who, err)
		}
		if r.Status.Allowed != a.want {
			t.Errorf("%s may %s: %v, want %v (%s)", who, a, r.Status.Allowed, a.want, r.Status.Reason)
		}
	}
}

// agentWatched are the resources the agent's informers list and watch
// cluster-wide (agent/k8s).
var agentWatched = []schema.GroupVersionResource{
	{Version: "v1", Resource: "pods"},
	{Version: "v1", Resource: "services"},
	{Version: "v1", Resource: "namespaces"},
	{Version: "v1", Resource: "nodes"},
	{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"},
	{Group: "networking.k8s.io", Version: "v1", Resource: "networkpolicies"},
	v1alpha1.AuthorizationPolicyResource,
	v1alpha1.PeerAuthenticationResource,
}

func checkAgentAccess(ctx context.Context, t *testing.T, cfg *rest.Config) {
	t.Helper()
	c := kubernetes.NewForConfigOrDie(cfg)
	var checks []access
	for _, r := range agentWatched {
		for _, v := range []string{"get", "list", "watch"} {
			checks = append(checks, access{verb: v, group: r.Group, resource: r.Resource, want: true})
		}
		for _, v := range []string{"create", "update", "patch", "delete"} {
			checks = append(checks, access{verb: v, group: r.Group, resource: r.Resource, namespace: "default", want: false})
		}
	}
	checks = append(checks,
		access{verb: "list", resource: "configmaps", namespace: ns, name: identity.BundleConfigMap, want: true},
		access{verb: "watch", resource: "configmaps", namespace: ns, name: identity.BundleConfigMap, want: true},
		access{verb: "list", resource: "configmaps", namespace: ns, want: false},
		access{verb: "get", resource: "configmaps", namespace: ns, name: "nodemesh-config", want: false},
		access{verb: "update", resource: "configmaps", namespace: ns, name: identity.BundleConfigMap, want: false},
		access{verb: "get", resource: "secrets", namespace: ns, name: "nodemesh-ca-root", want: false},
		access{verb: "list", resource: "secrets", want: false},
		access{verb: "create", group: "authentication.k8s.io", resource: "tokenreviews", want: false},
		access{verb: "patch", resource: "nodes", name: "any", want: false},
		access{verb: "create", resource: "events", namespace: ns, want: false},
	)
	review(ctx, t, "agent", c, checks)
}

// runAgentWatchers runs, with the agent's token, an informer for every
// resource the agent watches, and its trust bundle watcher; it fails the
// test if an informer cannot sync (RBAC). The returned channel receives
// the bundle the watcher loads.
func runAgentWatchers(ctx context.Context, t *testing.T, cfg *rest.Config) <-chan []*x509.Certificate {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })

	dyn := dynamic.NewForConfigOrDie(cfg)
	f := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	var mu sync.Mutex
	watchErrs := map[string]error{}
	var synced []cache.InformerSynced
	for _, r := range agentWatched {
		inf := f.ForResource(r).Informer()
		res := r.Resource
		if err := inf.SetWatchErrorHandler(func(_ *cache.Reflector, err error) {
			mu.Lock()
			watchErrs[res] = err
			mu.Unlock()
		}); err != nil {
			t.Fatal(err)
		}
		synced = append(synced, inf.HasSynced)
	}
	f.Start(ctx.Done())
	t.Cleanup(f.Shutdown)
	syncCtx, syncCancel := context.WithTimeout(ctx, time.Minute)
	defer syncCancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), synced...) {
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("the agent's informers did not sync with its own token: %v", watchErrs)
	}

	bundles := make(chan []*x509.Certificate, 1)
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	api := apiclienttest.New(t, cfg)
	wg.Add(1)
	go func() {
		defer wg.Done()
		err := idk8s.RunBundleWatcher(ctx, api, ns, identity.BundleConfigMap, func(roots []*x509.Certificate) error {
			select {
			case bundles <- roots:
			default:
			}
			return nil
		}, log)
		if err != nil && ctx.Err() == nil {
			t.Errorf("agent bundle watcher: %v", err)
		}
	}()
	return bundles
}

// runAgentInformers runs the agent's own informers (agent/k8s), with the
// agent's token, until its store reports the initial sync, and checks
// that the CRDs were watched, not skipped.
func runAgentInformers(ctx context.Context, t *testing.T, cfg *rest.Config) {
	t.Helper()
	store, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	var logBuf lockedBuffer
	in := &agentk8s.Informers{
		Client:  apiclienttest.New(t, cfg),
		Dynamic: dynamic.NewForConfigOrDie(cfg),
		Store:   store,
		Log:     slog.New(slog.NewTextHandler(&logBuf, nil)),
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("agent informers: %v", err)
		}
	}()
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if _, err := store.WaitFor(wctx, func(s *state.Snapshot) bool { return s.Synced() }); err != nil {
		t.Fatalf("the agent's informers did not sync with its own token: %v\n%s", err, logBuf.String())
	}
	// Every resource of the install is served and readable; the Gateway
	// API routes are not part of it (an optional CRD set, for L7).
	for _, l := range strings.Split(logBuf.String(), "\n") {
		optional := strings.Contains(l, agentk8s.HTTPRouteResource.Group+"/")
		if strings.Contains(l, "forbidden") || (strings.Contains(l, "not served") && !optional) {
			t.Errorf("agent informers logged problems:\n%s", logBuf.String())
			break
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// expandArgs resolves a container's env the way the kubelet does (values,
// downward API fields, ConfigMap keys) and expands $(VAR) in its args.
func expandArgs(t *testing.T, c corev1.Container, cm *corev1.ConfigMap, fields map[string]string) []string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil:
			v, ok := fields[e.ValueFrom.FieldRef.FieldPath]
			if !ok {
				t.Fatalf("no value for field %s", e.ValueFrom.FieldRef.FieldPath)
			}
			env[e.Name] = v
		case e.ValueFrom.ConfigMapKeyRef != nil:
			env[e.Name] = cm.Data[e.ValueFrom.ConfigMapKeyRef.Key]
		}
	}
	var out []string
	for _, a := range c.Args {
		out = append(out, varRef.ReplaceAllStringFunc(a, func(m string) string {
			if v, ok := env[m[2:len(m)-1]]; ok {
				return v
			}
			return m
		}))
	}
	return out
}

// goTool finds the go command: on PATH (the Makefile puts it there), else
// where the official installer puts it.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func writeKubeconfig(t *testing.T, srv *apiserver.Server, token, path string) {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["lab"] = &clientcmdapi.Cluster{Server: srv.URL, CertificateAuthority: srv.CAFile}
	cfg.AuthInfos["sa"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["lab"] = &clientcmdapi.Context{Cluster: "lab", AuthInfo: "sa"}
	cfg.CurrentContext = "lab"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// runningCA is the CA started by checkCARuns.
type runningCA struct {
	port     int
	agentPod *corev1.Pod // on nmtmanifests-node1
}

func checkCARuns(ctx context.Context, t *testing.T, c *cluster, def []*unstructured.Unstructured, bundleCh <-chan []*x509.Certificate) runningCA {
	t.Helper()
	admin := c.srv.Client
	var d appsv1.Deployment
	var cm corev1.ConfigMap
	for _, o := range def {
		switch {
		case o.GetKind() == "Deployment" && o.GetName() == "nodemesh-ca":
			mustConvert(t, o, &d)
		case o.GetKind() == "ConfigMap" && o.GetName() == "nodemesh-config":
			mustConvert(t, o, &cm)
		}
	}
	caSA := d.Spec.Template.Spec.ServiceAccountName
	review(ctx, t, "CA", kubernetes.NewForConfigOrDie(c.srv.ClientFor(token(ctx, t, admin, caSA, nil, nil))), []access{
		{verb: "create", group: "authentication.k8s.io", resource: "tokenreviews", want: true},
		{verb: "list", resource: "pods", want: true},
		{verb: "get", resource: "pods", namespace: ns, name: "x", want: true},
		{verb: "create", resource: "pods", namespace: ns, want: false},
		{verb: "delete", resource: "pods", namespace: "default", want: false},
		{verb: "get", resource: "secrets", namespace: ns, name: "nodemesh-ca-root", want: true},
		{verb: "update", resource: "secrets", namespace: ns, name: "nodemesh-ca-root", want: true},
		{verb: "get", resource: "secrets", namespace: ns, name: "someone-elses", want: false},
		{verb: "list", resource: "secrets", namespace: ns, want: false},
		{verb: "get", resource: "secrets", namespace: "default", name: "nodemesh-ca-root", want: false},
		{verb: "update", resource: "configmaps", namespace: ns, name: identity.BundleConfigMap, want: true},
		{verb: "update", resource: "configmaps", namespace: ns, name: "nodemesh-config", want: false},
		{verb: "list", resource: "nodes", want: false},
	})

	// Run the real CA binary with the Deployment's arguments.
	dir := t.TempDir()
	bin := filepath.Join(dir, "nodemesh-ca")
	build := exec.CommandContext(ctx, goTool(), "build", "-o", bin, "../cmd/nodemesh-ca")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building nodemesh-ca: %v\n%s", err, out)
	}
	kubeconfig := filepath.Join(dir, "ca.kubeconfig")
	writeKubeconfig(t, c.srv, token(ctx, t, admin, caSA, nil, nil), kubeconfig)
	args := expandArgs(t, d.Spec.Template.Spec.Containers[0], &cm, map[string]string{"metadata.namespace": ns})
	port := freePort(t)
	for i, a := range args {
		if strings.HasPrefix(a, "--listen=") {
			args[i] = fmt.Sprintf("--listen=127.0.0.1:%d", port)
		}
	}
	args = append(args, "--kubeconfig="+kubeconfig)
	t.Logf("nodemesh-ca %s", strings.Join(args, " "))
	var caLog lockedBuffer
	ca := exec.Command(bin, args...)
	ca.Stdout, ca.Stderr = &caLog, &caLog
	ca.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	caDone := make(chan error, 1)
	go func() { caDone <- ca.Wait() }()
	t.Cleanup(func() {
		_ = ca.Process.Signal(syscall.SIGTERM)
		select {
		case <-caDone:
		case <-time.After(30 * time.Second):
			_ = ca.Process.Kill()
			<-caDone
		}
		t.Logf("nodemesh-ca log:\n%s", caLog.String())
	})

	// The CA publishes the bundle; the agent's watcher (its own token)
	// receives it.
	var roots []*x509.Certificate
	select {
	case roots = <-bundleCh:
	case err := <-caDone:
		t.Fatalf("nodemesh-ca exited: %v\n%s", err, caLog.String())
	case <-time.After(2 * time.Minute):
		t.Fatalf("the agent's bundle watcher got no bundle; CA log:\n%s", caLog.String())
	}
	if _, err := admin.CoreV1().Secrets(ns).Get(ctx, "nodemesh-ca-root", metav1.GetOptions{}); err != nil {
		t.Errorf("the CA's root Secret: %v", err)
	}

	// A node with an agent pod and a running workload; another node without.
	for _, n := range []string{"nmtmanifests-node1", "nmtmanifests-node2"} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	agentPod := mustCreatePod(ctx, t, admin, ns, "nodemesh-agent-node1", "nodemesh-agent", "nmtmanifests-node1")
	const shop = "nmtmanifests-shop"
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: shop}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, sa := range []string{"web", "db"} {
		if _, err := admin.CoreV1().ServiceAccounts(shop).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mustCreatePod(ctx, t, admin, shop, "web-0", "web", "nmtmanifests-node1")
	mustCreatePod(ctx, t, admin, shop, "db-0", "db", "nmtmanifests-node2")

	td := spiffeid.RequireTrustDomainFromString(cm.Data["trust-domain"])
	caID := spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/"+caSA)
	agentCAToken := token(ctx, t, admin, "nodemesh-agent", []string{identity.Audience}, agentPod)
	client, err := svid.NewClient(svid.ClientConfig{
		URL:    fmt.Sprintf("https://127.0.0.1:%d", port),
		CAID:   caID,
		Bundle: x509bundle.FromX509Authorities(td, roots),
		Token:  func(context.Context) (string, error) { return agentCAToken, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	web := spiffeid.RequireFromPath(td, "/ns/"+shop+"/sa/web")
	var signed *svid.Signed
	err = wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		signed, err = client.Sign(ctx, web, csr)
		var ref *identity.RefusedError
		if errors.As(err, &ref) && ref.Code != identity.CodeUnavailable {
			return false, err // a decision, not a CA still starting
		}
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("signing %s for the agent on node1: %v\nCA log:\n%s", web, err, caLog.String())
	}
	if len(signed.Chain) == 0 || len(signed.Chain[0].URIs) != 1 || signed.Chain[0].URIs[0].String() != web.String() {
		t.Errorf("signed chain %v, want an SVID for %s", signed.Chain, web)
	}
	// The workload of the other node is refused: the CA read the pods.
	_, err = client.Sign(ctx, spiffeid.RequireFromPath(td, "/ns/"+shop+"/sa/db"), csr)
	var ref *identity.RefusedError
	if !errors.As(err, &ref) || ref.Code != identity.CodeNoWorkload {
		t.Errorf("signing db (on node2) for node1's agent: %v, want %s", err, identity.CodeNoWorkload)
	}
	return runningCA{port: port, agentPod: agentPod}
}

// runAgentBinary runs the real nodemesh-agent with the DaemonSet's
// arguments (env resolved as the kubelet would), a kubeconfig carrying the
// agent service account's token, and a pod-bound CA token, and waits until
// it reports ready: informers synced with its own RBAC, trust bundle
// loaded, capture loaded. Only the node-specific paths and ports are
// redirected to test-owned ones (cgroup, pins, loopback ports, the CA's
// address), so several tests can run at once. Then SIGTERM must end it
// within the DaemonSet's terminationGracePeriodSeconds.
func runAgentBinary(ctx context.Context, t *testing.T, c *cluster, def []*unstructured.Unstructured, ca runningCA) {
	t.Helper()
	privtest.Root(t) // capture: BPF and cgroups
	admin := c.srv.Client
	var ds appsv1.DaemonSet
	var cm corev1.ConfigMap
	for _, o := range def {
		switch {
		case o.GetKind() == "DaemonSet" && o.GetName() == "nodemesh-agent":
			mustConvert(t, o, &ds)
		case o.GetKind() == "ConfigMap" && o.GetName() == "nodemesh-config":
			mustConvert(t, o, &cm)
		}
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "nodemesh-agent")
	if out, err := exec.CommandContext(ctx, goTool(), "build", "-o", bin, "../cmd/nodemesh-agent").CombinedOutput(); err != nil {
		t.Fatalf("building nodemesh-agent: %v\n%s", err, out)
	}
	kubeconfig := filepath.Join(dir, "agent.kubeconfig")
	// Bound to the agent's pod, as the kubelet's projected token is: the
	// Lease admission policy (base/agent/admission.yaml) needs its node.
	writeKubeconfig(t, c.srv, token(ctx, t, admin, "nodemesh-agent", nil, ca.agentPod), kubeconfig)
	tokenFile := filepath.Join(dir, "ca-token")
	if err := os.WriteFile(tokenFile, []byte(token(ctx, t, admin, "nodemesh-agent", []string{identity.Audience}, ca.agentPod)), 0o600); err != nil {
		t.Fatal(err)
	}

	h, err := nodeinfo.DiscoverHierarchy("")
	if err != nil {
		t.Fatal(err)
	}
	cgroup := filepath.Join(h.Path, fmt.Sprintf("%slab-%d", privPrefix, os.Getpid()))
	if err := os.Mkdir(cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join("/sys/fs/bpf", fmt.Sprintf("%slab-%d", privPrefix, os.Getpid()))
	t.Cleanup(func() {
		_ = os.RemoveAll(pins)
		removeCgroups(t, cgroup)
	})

	ctr := ds.Spec.Template.Spec.Containers[0]
	args := expandArgs(t, ctr, &cm, map[string]string{
		"spec.nodeName": ca.agentPod.Spec.NodeName, "metadata.namespace": ns, "metadata.name": ca.agentPod.Name,
	})
	readiness := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	override := map[string]string{
		"ca-addr":       fmt.Sprintf("https://127.0.0.1:%d", ca.port),
		"ca-token-file": tokenFile,
		"bpf-pin-dir":   pins,
		// The lab plays kubelet through pod annotations; real nodes use proc.
		"pod-netns": "annotations",
		// The CNI plugin's socket and the node's CNI directories, private
		// to this test (nothing is chained: no network configuration).
		"cni-socket":   filepath.Join(t.TempDir(), "cni", "cni.sock"),
		"cni-conf-dir": t.TempDir(),
		"cni-bin-dir":  t.TempDir(),
	}
	for i, a := range args {
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if v, ok := override[name]; ok {
			args[i] = "--" + name + "=" + v
			delete(override, name)
		}
	}
	if len(override) > 0 {
		t.Fatalf("the DaemonSet lacks flags %v", override)
	}
	args = append(args, "--kubeconfig="+kubeconfig, "--cgroup-root="+cgroup,
		fmt.Sprintf("--admin-addr=127.0.0.1:%d", freePort(t)), fmt.Sprintf("--metrics-addr=127.0.0.1:%d", freePort(t)),
		"--readiness-addr="+readiness)
	t.Logf("nodemesh-agent %s", strings.Join(args, " "))

	var agentLog lockedBuffer
	agent := exec.Command(bin, args...)
	agent.Stdout, agent.Stderr = &agentLog, &agentLog
	agent.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- agent.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = agent.Process.Kill()
			<-done
		}
	})

	var body string
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		select {
		case err := <-done:
			stopped = true
			return false, fmt.Errorf("nodemesh-agent exited: %v", err)
		default:
		}
		code, b, err := httpGet(ctx, "http://"+readiness+"/healthz/ready")
		body = b
		return err == nil && code == 200, nil
	})
	if err != nil {
		t.Fatalf("nodemesh-agent not ready with the DaemonSet's arguments and its own token: %v\nlast readiness: %s\nlog:\n%s", err, body, agentLog.String())
	}
	t.Logf("agent ready: %s", strings.TrimSpace(body))
	// Ready, it marks its node (the Lease admission policy lets its
	// pod-bound token write its own node's mark).
	mark := "nodemesh-agent-" + ca.agentPod.Spec.NodeName
	if err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := admin.CoordinationV1().Leases(ns).Get(ctx, mark, metav1.GetOptions{})
		return err == nil, nil
	}); err != nil {
		t.Fatalf("the ready agent never marked its node (Lease %s): %v\nlog:\n%s", mark, err, agentLog.String())
	}

	grace := time.Duration(*ds.Spec.Template.Spec.TerminationGracePeriodSeconds) * time.Second
	start := time.Now()
	_ = agent.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		stopped = true
		if err != nil {
			t.Errorf("nodemesh-agent exit after SIGTERM: %v\n%s", err, agentLog.String())
		}
		t.Logf("agent stopped %s after SIGTERM (grace %s)", time.Since(start).Round(time.Millisecond), grace)
	case <-time.After(grace):
		t.Errorf("nodemesh-agent still running %s after SIGTERM: the kubelet would SIGKILL it\n%s", grace, agentLog.String())
	}
}

func httpGet(ctx context.Context, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return resp.StatusCode, string(b), nil
}

func mustCreatePod(ctx context.Context, t *testing.T, c kubernetes.Interface, namespace, name, sa, node string) *corev1.Pod {
	t.Helper()
	p, err := c.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, NodeName: node,
			Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/none"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", namespace, name, err)
	}
	p.Status.Phase = corev1.PodRunning
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if p, err = c.CoreV1().Pods(namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("marking pod %s/%s running: %v", namespace, name, err)
	}
	return p
}

func mustConvert(t *testing.T, o *unstructured.Unstructured, into any) {
	t.Helper()
	if err := k8sruntime.DefaultUnstructuredConverter.FromUnstructured(o.Object, into); err != nil {
		t.Fatalf("converting %s %s: %v", o.GetKind(), o.GetName(), err)
	}
}
