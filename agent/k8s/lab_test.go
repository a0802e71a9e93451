package k8s

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/labtest"
)

// TestLabInformers runs the informers against the real kube-apiserver:
// the store converges on created objects, follows label changes
// (enrollment), picks up CRDs installed after the agent started, and keeps
// serving its last snapshot after the API server is stopped.
func TestLabInformers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	srv := labtest.APIServer(ctx, t)
	stopped := false
	defer func() {
		if !stopped {
			srv.Stop()
		}
	}()
	c := srv.Client
	dyn, err := dynamic.NewForConfig(srv.REST)
	if err != nil {
		t.Fatal(err)
	}
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}

	const ns = "nmtk8s-shop"
	must(c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns,
		Labels: map[string]string{state.LabelMode: state.ModeEnabled}}}, metav1.CreateOptions{}))
	must(c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "web"}}, metav1.CreateOptions{}))
	must(c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "nmtk8s-node1"},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.77.1"}}}}, metav1.CreateOptions{}))

	st := newStore(t)
	seen := newLogSeen(slog.NewTextHandler(testWriter{t}, nil))
	inf := &Informers{Client: apiclienttest.New(t, srv.REST), Dynamic: dyn, Store: st, Log: slog.New(seen), CRDRecheck: 500 * time.Millisecond,
		Node: "nmtk8s-node1"}
	runCtx, stopRun := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() { runDone <- inf.Run(runCtx) }()
	defer func() {
		stopRun()
		if err := <-runDone; err != nil {
			t.Errorf("informers: %v", err)
		}
	}()
	wait := func(what string, cond func(*state.Snapshot) bool) *state.Snapshot {
		t.Helper()
		wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		snap, err := st.WaitFor(wctx, cond)
		if err != nil {
			t.Fatalf("waiting until %s: %v", what, err)
		}
		return snap
	}
	wait("synced", (*state.Snapshot).Synced)

	// A pod, as the lab's kubelet writes it: created, then given an IP.
	p, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Labels: map[string]string{"app": "web"},
			Annotations: map[string]string{state.AnnotationNetns: "/run/netns/nmtk8s-web-0", "unrelated": "x"}},
		Spec: corev1.PodSpec{NodeName: "nmtk8s-node1", ServiceAccountName: "web", Containers: []corev1.Container{{
			Name: "app", Image: "nginx", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
			Env: []corev1.EnvVar{{Name: "A", Value: "b"}},
		}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.10", PodIPs: []corev1.PodIP{{IP: "10.244.1.10"}}}
	must(c.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}))
	podIP := netip.MustParseAddr("10.244.1.10")
	snap := wait("the pod is indexed by IP", func(s *state.Snapshot) bool { return s.PodByIP(podIP) != nil })
	got := snap.PodByIP(podIP)
	if !got.Enrolled || got.Identity.String() != "spiffe://cluster.local/ns/"+ns+"/sa/web" || got.Node != "nmtk8s-node1" ||
		got.Netns() != "/run/netns/nmtk8s-web-0" || len(got.Annotations()) != 1 || len(got.Ports) != 1 {
		t.Fatalf("pod in the store: %+v", got)
	}
	if n := snap.Node("nmtk8s-node1"); n == nil || len(n.IPs) != 1 {
		t.Fatalf("node in the store: %+v", n)
	}
	// A pod of another node is stored without the detail only its own
	// node's agent reads, and with everything else.
	must(c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-remote", Labels: map[string]string{"app": "web"},
			Annotations: map[string]string{state.AnnotationNetns: "/run/netns/nmtk8s-web-remote", state.AnnotationExcludeInboundPorts: "9100"}},
		Spec: corev1.PodSpec{NodeName: "nmtk8s-node2", ServiceAccountName: "web", Containers: []corev1.Container{{
			Name: "app", Image: "nginx", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
	}, metav1.CreateOptions{}))
	snap = wait("the other node's pod is stored", func(s *state.Snapshot) bool { return s.Pod(ns, "web-remote") != nil })
	if r := snap.Pod(ns, "web-remote"); r.UID() != "" || r.Netns() != "" || !r.Enrolled || r.Node != "nmtk8s-node2" ||
		!slices.Equal(r.ExcludeInboundPorts(), []uint16{9100}) || len(r.Ports) != 1 || r.Labels["app"] != "web" {
		t.Fatalf("other node's pod in the store: %+v", r)
	}

	// A service and its EndpointSlice, as the lab's controllers write them.
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	must(c.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Labels: map[string]string{state.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.1.10"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: "web-0"}},
			{Addresses: []string{"10.244.1.11"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false)}},
		},
	}, metav1.CreateOptions{}))
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	snap = wait("the service has a backend", func(s *state.Snapshot) bool {
		sv, port, ok := s.ServiceByVIP(vip)
		return ok && len(s.Backends(sv, port)) > 0
	})
	sv, port, _ := snap.ServiceByVIP(vip)
	bs := snap.Backends(sv, port)
	if len(bs) != 1 || bs[0].Addr.String() != "10.244.1.10:8080" || snap.BackendPod(bs[0]) == nil || snap.BackendPod(bs[0]).Name != "web-0" {
		t.Fatalf("backends %+v", bs)
	}
	must(c.NetworkingV1().NetworkPolicies(ns).Create(ctx, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny"},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}, metav1.CreateOptions{}))
	wait("the NetworkPolicy arrives", func(s *state.Snapshot) bool { return len(s.NetworkPolicies(ns)) == 1 })

	// Label changes move enrollment.
	p, err = c.CoreV1().Pods(ns).Get(ctx, "web-0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Labels[state.LabelMode] = state.ModeDisabled
	must(c.CoreV1().Pods(ns).Update(ctx, p, metav1.UpdateOptions{}))
	wait("the pod opts out", func(s *state.Snapshot) bool { q := s.PodByIP(podIP); return q != nil && !q.Enrolled })
	delete(p.Labels, state.LabelMode)
	p.ResourceVersion = ""
	must(c.CoreV1().Pods(ns).Update(ctx, p, metav1.UpdateOptions{}))
	wait("the pod is back in", func(s *state.Snapshot) bool { q := s.PodByIP(podIP); return q != nil && q.Enrolled })
	nsObj, err := c.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nsObj.Labels[state.LabelMode] = "off"
	must(c.CoreV1().Namespaces().Update(ctx, nsObj, metav1.UpdateOptions{}))
	wait("the namespace leaves the mesh", func(s *state.Snapshot) bool { q := s.PodByIP(podIP); return q != nil && !q.Enrolled })
	nsObj.Labels[state.LabelMode] = state.ModeEnabled
	nsObj.ResourceVersion = ""
	must(c.CoreV1().Namespaces().Update(ctx, nsObj, metav1.UpdateOptions{}))
	wait("the namespace rejoins", func(s *state.Snapshot) bool { q := s.PodByIP(podIP); return q != nil && q.Enrolled })

	// The CRDs are installed after the agent started: it picks them up.
	// A minimal CRD for the same resource, so this test checks the
	// informer path independently of the real CRDs' schema (manifests/crds,
	// tested by agent/policy/v1alpha1).
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	must(dyn.Resource(crdGVR).Create(ctx, &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
		"metadata": map[string]any{"name": "authorizationpolicies.security.nodemesh.io"},
		"spec": map[string]any{
			"group": "security.nodemesh.io", "scope": "Namespaced",
			"names": map[string]any{"plural": "authorizationpolicies", "singular": "authorizationpolicy", "kind": "AuthorizationPolicy", "listKind": "AuthorizationPolicyList"},
			"versions": []any{map[string]any{"name": "v1alpha1", "served": true, "storage": true,
				"schema": map[string]any{"openAPIV3Schema": map[string]any{"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}},
		},
	}}, metav1.CreateOptions{}))
	ap := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "allow", "namespace": ns},
		"spec":     map[string]any{"action": "ALLOW", "rules": []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{"principals": []any{"cluster.local/ns/x/sa/y"}}}}}}},
	}}
	apGVR := DefaultCustomResources[0]
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err := dyn.Resource(apGVR).Namespace(ns).Create(ctx, ap, metav1.CreateOptions{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("creating an AuthorizationPolicy once the CRD is established: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	gk := state.GroupKind{Group: "security.nodemesh.io", Kind: "AuthorizationPolicy"}
	snap = wait("the AuthorizationPolicy arrives", func(s *state.Snapshot) bool { return len(s.Objects(gk)) == 1 })
	if o := snap.Objects(gk)[0]; o.Name != "allow" || o.Content["spec"] == nil {
		t.Fatalf("object %+v", o)
	}

	// API server gone: the last snapshot stays in force.
	before := st.Snapshot()
	// Proof that the agent tried the API server after it stopped (a sleep
	// could assert before anything was tried): a watch error, or, since
	// client-go retries a refused watch without reporting it, two failed
	// rechecks of the CRD that is still missing (peerauthentications), made
	// with the same client.
	const watchFailed = "watch of the API server failed, keeping the last known state"
	const recheckFailed = "checking for a custom resource"
	base := map[string]int{watchFailed: seen.count(watchFailed), recheckFailed: seen.count(recheckFailed) + 1}
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	stopped = true
	seen.waitAny(t, base)
	after := st.Snapshot()
	if q := after.PodByIP(podIP); q == nil || !q.Enrolled {
		t.Fatal("pod lost after the API server stopped")
	}
	if sv, port, ok := after.ServiceByVIP(vip); !ok || len(after.Backends(sv, port)) != 1 {
		t.Fatal("service lost after the API server stopped")
	}
	if after.Version() != before.Version() || !after.Synced() {
		t.Fatalf("state changed while the API server was down: version %d -> %d", before.Version(), after.Version())
	}
	select {
	case err := <-runDone:
		t.Fatalf("informers stopped when the API server went away: %v", err)
		runDone <- err
	default:
	}
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}
