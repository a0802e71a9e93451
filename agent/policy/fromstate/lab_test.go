package fromstate

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/k8s"
	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/manifests"
)

// TestLabPolicyFollowsTheAPIServer runs the agent's control-plane path for
// policy against the real kube-apiserver: informers (agent/k8s) feed the
// state store, each state version becomes a policy snapshot, and decisions
// follow NetworkPolicy, AuthorizationPolicy, PeerAuthentication, pod label
// and namespace label changes. It logs how long each change took to flip a
// decision (the budget for revoking open connections is one second; the test
// allows much more so a loaded machine cannot fail it).
func TestLabPolicyFollowsTheAPIServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	srv := labtest.APIServer(ctx, t)
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

	crds, err := manifests.Render("../../../manifests/crds")
	if err != nil {
		t.Fatal(err)
	}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		must(dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}))
	}

	// Two enrolled namespaces, a node, and pods with IPs (the lab's job:
	// there is no kubelet).
	for _, ns := range []string{"nmtpol-shop", "nmtpol-other"} {
		must(c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{state.LabelMode: state.ModeEnabled}}}, metav1.CreateOptions{}))
		must(c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}))
	}
	must(c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "nmtpol-node"}}, metav1.CreateOptions{}))
	pods := map[string]netip.Addr{"nmtpol-shop/fe": netip.MustParseAddr("10.7.0.1"), "nmtpol-shop/be": netip.MustParseAddr("10.7.0.2"), "nmtpol-other/ot": netip.MustParseAddr("10.7.1.1")}
	for key, ip := range pods {
		ns, name := key[:len(key)-3], key[len(key)-2:]
		p, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}},
			Spec: corev1.PodSpec{NodeName: "nmtpol-node", Containers: []corev1.Container{{
				Name: "app", Image: "example/app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
			}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Status.Phase = corev1.PodRunning
		p.Status.PodIP = ip.String()
		p.Status.PodIPs = []corev1.PodIP{{IP: ip.String()}}
		must(c.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}))
	}

	store, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	api := apiclienttest.New(t, srv.REST)
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		inf := &k8s.Informers{Client: api, Dynamic: dyn, Store: store, CRDRecheck: time.Second}
		if err := inf.Run(runCtx); err != nil {
			t.Errorf("informers: %v", err)
		}
	}()
	defer func() { stop(); wg.Wait() }()

	engine, err := policy.NewEngine(0)
	if err != nil {
		t.Fatal(err)
	}
	be := "nmtpol-shop/be"
	feToBE := policy.Flow{Src: pods["nmtpol-shop/fe"], Dst: pods[be], Port: 8080, Protocol: corev1.ProtocolTCP, Principal: "spiffe://cluster.local/ns/nmtpol-shop/sa/default"}
	otToBE := policy.Flow{Src: pods["nmtpol-other/ot"], Dst: pods[be], Port: 8080, Protocol: corev1.ProtocolTCP, Principal: "spiffe://cluster.local/ns/nmtpol-other/sa/default"}
	plainToBE := policy.Flow{Src: netip.MustParseAddr("10.99.0.1"), Dst: pods[be], Port: 8080, Protocol: corev1.ProtocolTCP}

	// await waits until the decisions for flows match want, and reports how
	// long the change took to arrive.
	await := func(what string, want map[*policy.Flow]policy.Verdict) {
		t.Helper()
		start := time.Now()
		wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
		defer wcancel()
		var last string
		_, err := store.WaitFor(wctx, func(s *state.Snapshot) bool {
			if !s.Synced() {
				return false
			}
			ps, errs := Snapshot(s, "")
			if len(errs) > 0 {
				last = fmt.Sprint(errs)
				return false
			}
			for f, v := range want {
				if d := engine.DecideIngress(ps, *f); d.Verdict != v {
					last = d.Text()
					return false
				}
			}
			return true
		})
		if err != nil {
			t.Fatalf("%s: %v\nlast decision:\n%s", what, err, last)
		}
		t.Logf("%s: decisions followed in %v", what, time.Since(start).Round(time.Millisecond))
	}

	await("initial sync", map[*policy.Flow]policy.Verdict{&feToBE: policy.Allow, &otToBE: policy.Allow, &plainToBE: policy.Allow})

	// NetworkPolicy: only pods labelled app=fe may reach be.
	must(c.NetworkingV1().NetworkPolicies("nmtpol-shop").Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "be-from-fe"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "be"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "fe"}}},
				{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"trusted": "yes"}}},
			}}},
		},
	}, metav1.CreateOptions{}))
	await("NetworkPolicy created", map[*policy.Flow]policy.Verdict{&feToBE: policy.Allow, &otToBE: policy.Deny, &plainToBE: policy.Deny})

	// Namespace label change admits the other namespace.
	ns, err := c.CoreV1().Namespaces().Get(ctx, "nmtpol-other", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns.Labels["trusted"] = "yes"
	must(c.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}))
	await("namespace label added", map[*policy.Flow]policy.Verdict{&otToBE: policy.Allow})

	// Pod label change removes fe from the allowed set.
	fe, err := c.CoreV1().Pods("nmtpol-shop").Get(ctx, "fe", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fe.Labels["app"] = "fe-renamed"
	must(c.CoreV1().Pods("nmtpol-shop").Update(ctx, fe, metav1.UpdateOptions{}))
	await("pod label changed", map[*policy.Flow]policy.Verdict{&feToBE: policy.Deny, &otToBE: policy.Allow})

	// AuthorizationPolicy DENY on the other namespace's identity.
	apRes := dyn.Resource(v1alpha1.AuthorizationPolicyResource).Namespace("nmtpol-shop")
	must(apRes.Create(ctx, &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.SchemeGroupVersion.String(), "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "deny-other"},
		"spec": map[string]any{"action": "DENY", "rules": []any{map[string]any{
			"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{"nmtpol-other"}}}},
		}}},
	}}, metav1.CreateOptions{FieldValidation: "Strict"}))
	await("AuthorizationPolicy DENY created", map[*policy.Flow]policy.Verdict{&otToBE: policy.Deny})
	must(nil, apRes.Delete(ctx, "deny-other", metav1.DeleteOptions{}))
	await("AuthorizationPolicy deleted", map[*policy.Flow]policy.Verdict{&otToBE: policy.Allow})

	// PeerAuthentication STRICT for the namespace refuses plaintext, which
	// the NetworkPolicy would otherwise decide; allow it by ipBlock first.
	np, err := c.NetworkingV1().NetworkPolicies("nmtpol-shop").Get(ctx, "be-from-fe", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	np.Spec.Ingress[0].From = append(np.Spec.Ingress[0].From, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: "10.99.0.0/16"}})
	must(c.NetworkingV1().NetworkPolicies("nmtpol-shop").Update(ctx, np, metav1.UpdateOptions{}))
	await("NetworkPolicy updated", map[*policy.Flow]policy.Verdict{&plainToBE: policy.Allow})
	must(dyn.Resource(v1alpha1.PeerAuthenticationResource).Namespace("nmtpol-shop").Create(ctx, &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.SchemeGroupVersion.String(), "kind": "PeerAuthentication",
		"metadata": map[string]any{"name": "strict"},
		"spec":     map[string]any{"mtls": map[string]any{"mode": "STRICT"}},
	}}, metav1.CreateOptions{FieldValidation: "Strict"}))
	await("PeerAuthentication STRICT created", map[*policy.Flow]policy.Verdict{&plainToBE: policy.Deny, &otToBE: policy.Allow})
}
