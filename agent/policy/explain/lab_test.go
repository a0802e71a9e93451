package explain

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/k8s"
	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/agent/k8s/yamljson"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/fromstate"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/manifests"
)

// resources maps the kinds of testdata/intake to their API resources.
var resources = map[string]schema.GroupVersionResource{
	"Namespace":           {Version: "v1", Resource: "namespaces"},
	"ServiceAccount":      {Version: "v1", Resource: "serviceaccounts"},
	"Node":                {Version: "v1", Resource: "nodes"},
	"Pod":                 {Version: "v1", Resource: "pods"},
	"NetworkPolicy":       {Group: "networking.k8s.io", Version: "v1", Resource: "networkpolicies"},
	"PeerAuthentication":  v1alpha1.PeerAuthenticationResource,
	"AuthorizationPolicy": v1alpha1.AuthorizationPolicyResource,
}

// TestLabExplainMatchesAgent feeds one set of YAML to the real API server,
// where the agent's intake reads it (informers into agent/state, then
// fromstate), and to offline explain (--from-files), and checks that both
// decide every flow of a matrix the same way.
func TestLabExplainMatchesAgent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
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
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// Create every object as kubectl would, with its status where kubelet
	// and the controllers would write one.
	data, err := os.ReadFile("testdata/intake/cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	pods := 0
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		js, err := yamljson.ToJSON(doc)
		if err != nil {
			t.Fatal(err)
		}
		var u unstructured.Unstructured
		if err := u.UnmarshalJSON(js); err != nil {
			t.Fatal(err)
		}
		gvr, ok := resources[u.GetKind()]
		if !ok {
			t.Fatalf("no resource for %s", u.GetKind())
		}
		status, hasStatus := u.Object["status"]
		u.SetUID("") // the API server assigns UIDs
		var res dynamic.ResourceInterface = dyn.Resource(gvr)
		if ns := u.GetNamespace(); ns != "" {
			res = dyn.Resource(gvr).Namespace(ns)
		}
		created, err := createRetrying(ctx, res, &u)
		if err != nil {
			t.Fatalf("creating %s %s/%s: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
		}
		if hasStatus {
			created.Object["status"] = status
			if _, err := res.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
				t.Fatalf("status of %s %s: %v", u.GetKind(), u.GetName(), err)
			}
		}
		if u.GetKind() == "Pod" {
			pods++
		}
	}

	store, err := state.NewStore(spiffeid.RequireTrustDomainFromString(policy.DefaultTrustDomain))
	if err != nil {
		t.Fatal(err)
	}
	api := apiclienttest.New(t, srv.REST)
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		inf := &k8s.Informers{Client: api, Dynamic: dyn, Store: store, CRDRecheck: time.Second}
		if err := inf.Run(runCtx); err != nil {
			t.Errorf("informers: %v", err)
		}
	})
	defer func() { stop(); wg.Wait() }()
	snap, err := store.WaitFor(ctx, func(s *state.Snapshot) bool {
		running := 0
		for _, p := range s.Pods() {
			if len(p.IPs) > 0 {
				running++
			}
		}
		return s.Synced() && running == pods && len(s.Objects(fromstate.PeerAuthenticationKind)) == 1 &&
			len(s.Objects(fromstate.AuthorizationPolicyKind)) == 1 && len(s.NetworkPolicies("")) == 1 && len(s.Nodes()) == 1
	})
	if err != nil {
		t.Fatalf("waiting for the informers: %v", err)
	}
	live, errs := fromstate.Snapshot(snap, "")
	if len(errs) > 0 {
		t.Fatalf("live intake: %v", errs)
	}
	var warn bytes.Buffer
	offline, err := LoadDir("testdata/intake", policy.Options{}, &warn)
	if err != nil {
		t.Fatalf("offline intake: %v\n%s", err, warn.String())
	}

	ip := netip.MustParseAddr
	var flows []policy.Flow
	for _, src := range []policy.Flow{
		{SrcPod: "shop/a", Principal: "spiffe://cluster.local/ns/shop/sa/default"},
		{SrcPod: "shop/a"},
		{SrcPod: "y/c"},
		{Src: ip("192.168.7.1")}, // the node: kubelet probes
		{Src: ip("203.0.113.9")},
	} {
		for _, dst := range []string{"y/b", "y/c", "shop/a"} {
			for _, port := range []uint16{8080, 8081, 9090, 7070, 443} {
				f := src
				f.DstPod, f.Port, f.Protocol = dst, port, corev1.ProtocolTCP
				flows = append(flows, f)
			}
		}
	}
	engine, err := policy.NewEngine(0)
	if err != nil {
		t.Fatal(err)
	}
	allowed := 0
	for _, f := range flows {
		l, o := engine.Decide(live, f), engine.Decide(offline, f)
		if l.Verdict != o.Verdict || l.Reason != o.Reason || l.Policy != o.Policy || l.Rule != o.Rule || len(l.Audit) != len(o.Audit) {
			t.Errorf("%+v: the agent and offline explain disagree\n--- agent\n%s--- explain\n%s", f, l.Text(), o.Text())
		}
		if l.Allowed() {
			allowed++
		}
	}
	// The matrix must exercise both verdicts, and the cases that once
	// differed: the probe port under STRICT from the node, the init
	// container's named port, the namespace "y" and the label value "on".
	for _, tc := range []struct {
		f    policy.Flow
		want policy.Verdict
	}{
		{policy.Flow{Src: ip("192.168.7.1"), DstPod: "y/b", Port: 8081, Protocol: corev1.ProtocolTCP}, policy.Allow},
		{policy.Flow{Src: ip("203.0.113.9"), DstPod: "y/b", Port: 8081, Protocol: corev1.ProtocolTCP}, policy.Deny},
		// The sidecar (restartPolicy: Always init container) serves its
		// named port "metrics"; the ordinary init container's "seed" has
		// exited before the pod serves and allows nothing (TestSidecarNamedPorts).
		{policy.Flow{SrcPod: "shop/a", Principal: "spiffe://cluster.local/ns/shop/sa/default", DstPod: "y/b", Port: 9090, Protocol: corev1.ProtocolTCP}, policy.Allow},
		{policy.Flow{SrcPod: "shop/a", Principal: "spiffe://cluster.local/ns/shop/sa/default", DstPod: "y/b", Port: 7070, Protocol: corev1.ProtocolTCP}, policy.Deny},
		{policy.Flow{SrcPod: "shop/a", Principal: "spiffe://cluster.local/ns/shop/sa/default", DstPod: "y/b", Port: 8080, Protocol: corev1.ProtocolTCP}, policy.Allow},
		{policy.Flow{SrcPod: "y/c", DstPod: "y/b", Port: 8080, Protocol: corev1.ProtocolTCP}, policy.Deny},
	} {
		if d := engine.Decide(live, tc.f); d.Verdict != tc.want {
			t.Errorf("%+v: %s, want %s\n%s", tc.f, d.Verdict, tc.want, d.Text())
		}
	}
	t.Logf("%d flows, %d allowed, decided alike by the agent's intake and offline explain", len(flows), allowed)
}

// createRetrying creates u, retrying while the API server has not
// registered a just-created CRD's resource yet.
func createRetrying(ctx context.Context, res dynamic.ResourceInterface, u *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	for {
		c, err := res.Create(ctx, u, metav1.CreateOptions{FieldValidation: "Strict"})
		if err == nil || ctx.Err() != nil {
			return c, err
		}
		if k := u.GetKind(); k != "PeerAuthentication" && k != "AuthorizationPolicy" {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(200 * time.Millisecond):
		}
	}
}
