package v1alpha1_test

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/manifests"
)

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// TestLabCRDs installs manifests/crds into the real kube-apiserver and checks
// that valid policies round-trip into the Go types unchanged (nothing pruned)
// and are accepted by the engine (L7 fields included), and that the API
// server itself refuses unsupported fields and modes and malformed values
// with the CRDs' messages.
func TestLabCRDs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	srv := labtest.APIServer(ctx, t)
	dyn, err := dynamic.NewForConfig(srv.REST)
	if err != nil {
		t.Fatal(err)
	}

	crds, err := manifests.Render("../../../manifests/crds")
	if err != nil {
		t.Fatal(err)
	}
	if len(crds) != 3 {
		t.Fatalf("manifests/crds renders %d objects, want 3", len(crds))
	}
	for _, crd := range crds {
		if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating CRD %s: %v", crd.GetName(), err)
		}
	}
	for _, crd := range crds {
		waitEstablished(ctx, t, dyn, crd.GetName())
	}

	const ns = "nmtpolicy-shop"
	if _, err := srv.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	goodAP := &v1alpha1.AuthorizationPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "AuthorizationPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "backend"},
		Spec: v1alpha1.AuthorizationPolicySpec{
			Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": "backend"}},
			Action:   v1alpha1.ActionAllow,
			Rules: []v1alpha1.Rule{{
				From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{
					Principals: []string{"spiffe://cluster.local/ns/" + ns + "/sa/frontend"}, NotPrincipals: []string{"*/sa/blocked"},
					Namespaces: []string{"nmtpolicy-*"}, NotNamespaces: []string{"kube-system"},
					IPBlocks: []string{"10.0.0.0/8", "192.168.1.1"}, NotIPBlocks: []string{"10.9.0.0/16"},
				}}},
				To: []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{Ports: []string{"8080"}, NotPorts: []string{"9090"}}}},
			}, {
				// L7 fields: accepted, decided per request on opted-in Services.
				To: []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{
					Methods: []string{"GET", "HEAD"}, NotMethods: []string{"DELETE"},
					Paths: []string{"/api/*", "*.png", "/healthz"}, NotPaths: []string{"/api/private*"},
					Hosts: []string{"Shop.Example", "*.shop.svc:8080"}, NotHosts: []string{"admin.*"},
				}}},
				When: []v1alpha1.Condition{{Key: "request.headers[x-canary]", Values: []string{"true"}}, {Key: "request.headers[User-Agent]", NotValues: []string{"bot*"}}},
			}},
		},
	}
	goodPA := &v1alpha1.PeerAuthentication{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "PeerAuthentication"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "backend"},
		Spec: v1alpha1.PeerAuthenticationSpec{
			Selector:      &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": "backend"}},
			Mtls:          &v1alpha1.PeerAuthenticationMTLS{Mode: v1alpha1.MTLSStrict},
			PortLevelMtls: map[string]v1alpha1.PeerAuthenticationMTLS{"8081": {Mode: v1alpha1.MTLSPermissive}},
		},
	}
	apRes := dyn.Resource(v1alpha1.AuthorizationPolicyResource).Namespace(ns)
	paRes := dyn.Resource(v1alpha1.PeerAuthenticationResource).Namespace(ns)
	strict := metav1.CreateOptions{FieldValidation: "Strict"}

	create := func(res dynamic.ResourceInterface, obj runtime.Object) (*unstructured.Unstructured, error) {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
		if err != nil {
			t.Fatalf("converting %T: %v", obj, err)
		}
		return res.Create(ctx, &unstructured.Unstructured{Object: m}, strict)
	}

	// Valid objects round-trip unchanged into the Go types.
	u, err := create(apRes, goodAP)
	if err != nil {
		t.Fatalf("creating a valid AuthorizationPolicy: %v", err)
	}
	var gotAP v1alpha1.AuthorizationPolicy
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &gotAP); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(gotAP.Spec, goodAP.Spec) {
		t.Errorf("AuthorizationPolicy changed on the way through the API server:\nsent %+v\ngot  %+v", goodAP.Spec, gotAP.Spec)
	}
	u, err = create(paRes, goodPA)
	if err != nil {
		t.Fatalf("creating a valid PeerAuthentication: %v", err)
	}
	var gotPA v1alpha1.PeerAuthentication
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &gotPA); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(gotPA.Spec, goodPA.Spec) {
		t.Errorf("PeerAuthentication changed on the way through the API server:\nsent %+v\ngot  %+v", goodPA.Spec, gotPA.Spec)
	}

	// What the API server stored is what the engine enforces.
	if err := policy.ValidateAuthorizationPolicy(&gotAP); err != nil {
		t.Errorf("engine refuses the stored AuthorizationPolicy: %v", err)
	}
	if err := policy.ValidatePeerAuthentication(&gotPA); err != nil {
		t.Errorf("engine refuses the stored PeerAuthentication: %v", err)
	}
	snap := policy.NewSnapshot(1, policy.Input{
		Pods: []policy.Pod{
			{Namespace: ns, Name: "be", Labels: map[string]string{"app": "backend"}, IPs: []netip.Addr{netip.MustParseAddr("10.1.0.2")}, ServiceAccount: "backend"},
			{Namespace: ns, Name: "fe", Labels: map[string]string{"app": "frontend"}, IPs: []netip.Addr{netip.MustParseAddr("10.1.0.1")}, ServiceAccount: "frontend"},
		},
		AuthorizationPolicies: []*v1alpha1.AuthorizationPolicy{&gotAP},
		PeerAuthentications:   []*v1alpha1.PeerAuthentication{&gotPA},
	}, policy.Options{})
	fe := "spiffe://cluster.local/ns/" + ns + "/sa/frontend"
	if d := snap.Decide(policy.Flow{SrcPod: ns + "/fe", DstPod: ns + "/be", Port: 8080, Protocol: corev1.ProtocolTCP, Principal: fe}); !d.Allowed() {
		t.Errorf("frontend -> backend:8080 over mTLS denied:\n%s", d.Text())
	}
	if d := snap.Decide(policy.Flow{SrcPod: ns + "/fe", DstPod: ns + "/be", Port: 8080, Protocol: corev1.ProtocolTCP}); d.Allowed() {
		t.Errorf("plaintext to a STRICT port allowed:\n%s", d.Text())
	}

	// The API server refuses what the engine refuses, with the same advice.
	refused := []struct {
		name string
		res  dynamic.ResourceInterface
		obj  func() runtime.Object
		want string
	}{
		{"path with a %-escape", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[1].To[0].Operation.Paths = []string{"/a%2Fb"}
			return p
		}, "should match"},
		{"relative path", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[1].To[0].Operation.NotPaths = []string{"admin"}
			return p
		}, "should match"},
		{"method with a space", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[1].To[0].Operation.Methods = []string{"GE T"}
			return p
		}, "should match"},
		{"when on another key", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[0].When = []v1alpha1.Condition{{Key: "source.ip", Values: []string{"10.0.0.1"}}}
			return p
		}, "should match"},
		{"when on X-Forwarded-For", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[0].When = []v1alpha1.Condition{{Key: "request.headers[X-Forwarded-For]", Values: []string{"10.0.0.1"}}}
			return p
		}, "never decide access"},
		{"when without values", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[0].When = []v1alpha1.Condition{{Key: "request.headers[x]"}}
			return p
		}, "values or notValues is required"},
		{"requestPrincipals", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[0].From[0].Source.RequestPrincipals = []string{"*"}
			return p
		}, "not enforced by nodemesh"},
		{"CUSTOM", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Action = v1alpha1.ActionCustom
			return p
		}, "CUSTOM"},
		{"unknown action", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Action = "MAYBE"
			return p
		}, "Unsupported value"},
		{"port out of range", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[0].To[0].Operation.Ports = []string{"70000"}
			return p
		}, "port must be 1-65535"},
		{"named port", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[0].To[0].Operation.Ports = []string{"http"}
			return p
		}, "should match"},
		{"bad ipBlock", apRes, func() runtime.Object {
			p := goodAP.DeepCopy()
			p.Spec.Rules[0].From[0].Source.IPBlocks = []string{"10.0.0.0/33"}
			return p
		}, "IP address or a CIDR"},
		{"DISABLE", paRes, func() runtime.Object {
			p := goodPA.DeepCopy()
			p.Spec.Mtls.Mode = v1alpha1.MTLSDisable
			return p
		}, "DISABLE is not supported"},
		{"portLevelMtls without selector", paRes, func() runtime.Object {
			p := goodPA.DeepCopy()
			p.Spec.Selector = nil
			return p
		}, "portLevelMtls needs selector"},
		{"portLevelMtls bad key", paRes, func() runtime.Object {
			p := goodPA.DeepCopy()
			p.Spec.PortLevelMtls = map[string]v1alpha1.PeerAuthenticationMTLS{"http": {Mode: v1alpha1.MTLSStrict}}
			return p
		}, "port numbers"},
	}
	for i, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			obj := tc.obj()
			obj.(metav1.Object).SetName(fmt.Sprintf("refused-%d", i))
			_, err := create(tc.res, obj)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("API server answered %v, want an error containing %q", err, tc.want)
			}
		})
	}

	// A misspelt field is an error with strict field validation (kubectl's default).
	bad := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.SchemeGroupVersion.String(), "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "typo", "namespace": ns},
		"spec":     map[string]any{"rules": []any{map[string]any{"form": []any{}}}},
	}}
	if _, err := apRes.Create(ctx, bad, strict); err == nil || !strings.Contains(err.Error(), "unknown field") {
		t.Errorf("misspelt field: %v, want an unknown field error", err)
	}
}

func waitEstablished(ctx context.Context, t *testing.T, dyn dynamic.Interface, name string) {
	t.Helper()
	for {
		u, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
			for _, c := range conds {
				m, _ := c.(map[string]any)
				if m["type"] == "Established" && m["status"] == "True" {
					return
				}
				if m["type"] == "NamesAccepted" && m["status"] == "False" {
					t.Fatalf("CRD %s: names not accepted: %v", name, m["message"])
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("CRD %s not established: %v (last error %v)", name, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
