package v1alpha1_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
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
	"k8s.io/client-go/rest"

	"github.com/nodemesh/nodemesh/agent/l7/resilience"
	"github.com/nodemesh/nodemesh/agent/l7/v1alpha1"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/manifests"
)

// TestLabTrafficPolicyCRD installs manifests/crds into the real
// kube-apiserver: a valid TrafficPolicy round-trips into the Go types
// unchanged and compiles (agent/l7/resilience), invalid ones are refused by
// the API server with the CRD's messages, and kubectl's table shows the
// printer columns.
func TestLabTrafficPolicyCRD(t *testing.T) {
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
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating CRD %s: %v", crd.GetName(), err)
		}
	}
	const ns = "nmtraffic"
	if _, err := srv.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	res := dyn.Resource(v1alpha1.TrafficPolicyResource).Namespace(ns)
	strict := metav1.CreateOptions{FieldValidation: "Strict"}
	create := func(tp *v1alpha1.TrafficPolicy) (*unstructured.Unstructured, error) {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(tp)
		if err != nil {
			t.Fatal(err)
		}
		return res.Create(ctx, &unstructured.Unstructured{Object: m}, strict)
	}
	grpc := int32(14)
	good := &v1alpha1.TrafficPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "TrafficPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews"},
		Spec: v1alpha1.TrafficPolicySpec{
			TargetRefs: []v1alpha1.TargetRef{{Group: "", Kind: "Service", Name: "reviews"}},
			Fault: &v1alpha1.Fault{
				Delay: &v1alpha1.FaultDelay{Percentage: 12.5, FixedDelay: "1s500ms"},
				Abort: &v1alpha1.FaultAbort{Percentage: 5, HTTPStatus: 503, GRPCStatus: &grpc},
			},
			RateLimit: &v1alpha1.RateLimit{RequestsPerSecond: 100, Burst: 200, PerSource: true},
		},
	}
	var u *unstructured.Unstructured
	waitfor.NoError(t, 60*time.Second, "a valid TrafficPolicy created (CRD established)", func() error {
		u, err = create(good)
		return err
	})
	var got v1alpha1.TrafficPolicy
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Spec, good.Spec) {
		t.Errorf("TrafficPolicy changed on the way through the API server:\nsent %+v\ngot  %+v", good.Spec, got.Spec)
	}
	if set := resilience.Compile([]*v1alpha1.TrafficPolicy{&got}); len(set.Problems()) > 0 {
		t.Errorf("the agent refuses the stored TrafficPolicy: %v", set.Problems())
	}

	refused := []struct {
		name string
		mod  func(*v1alpha1.TrafficPolicy)
		want string
	}{
		{"no fault, no rateLimit", func(p *v1alpha1.TrafficPolicy) { p.Spec.Fault, p.Spec.RateLimit = nil, nil }, "needs fault or rateLimit"},
		{"a Gateway target", func(p *v1alpha1.TrafficPolicy) { p.Spec.TargetRefs[0].Kind = "Gateway" }, "targetRefs name Services"},
		{"no targets", func(p *v1alpha1.TrafficPolicy) { p.Spec.TargetRefs = nil }, "targetRefs"},
		{"percentage over 100", func(p *v1alpha1.TrafficPolicy) { p.Spec.Fault.Delay.Percentage = 100.5 }, "less than or equal to 100"},
		{"a delay without a unit", func(p *v1alpha1.TrafficPolicy) { p.Spec.Fault.Delay.FixedDelay = "5" }, "should match"},
		{"an abort without a status", func(p *v1alpha1.TrafficPolicy) {
			p.Spec.Fault.Abort.HTTPStatus, p.Spec.Fault.Abort.GRPCStatus = 0, nil
		}, "abort needs httpStatus or grpcStatus"},
		{"an HTTP status out of range", func(p *v1alpha1.TrafficPolicy) { p.Spec.Fault.Abort.HTTPStatus = 99 }, "greater than or equal to 200"},
		{"a fault with nothing in it", func(p *v1alpha1.TrafficPolicy) { p.Spec.Fault.Delay, p.Spec.Fault.Abort = nil, nil }, "fault needs delay or abort"},
		{"zero requests per second", func(p *v1alpha1.TrafficPolicy) { p.Spec.RateLimit.RequestsPerSecond = 0 }, "requestsPerSecond"},
	}
	for i, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			p := good.DeepCopy()
			p.Name = "refused-" + string(rune('a'+i))
			tc.mod(p)
			if _, err := create(p); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("API server answered %v, want an error containing %q", err, tc.want)
			}
		})
	}

	// kubectl get nmtp: the printer columns, as the server's table.
	hc, err := rest.HTTPClientFor(srv.REST)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.REST.Host+"/apis/traffic.nodemesh.io/v1alpha1/namespaces/"+ns+"/trafficpolicies", nil)
	req.Header.Set("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var table metav1.Table
	if err := json.Unmarshal(body, &table); err != nil || len(table.Rows) != 1 {
		t.Fatalf("table: %v, %d rows: %s", err, len(table.Rows), body)
	}
	var cols []string
	for _, c := range table.ColumnDefinitions {
		cols = append(cols, c.Name)
	}
	if strings.Join(cols, ",") != "Name,Target,Delay%,Abort%,Rate,Age" {
		t.Errorf("columns %v", cols)
	}
	row := table.Rows[0].Cells
	if row[1] != "reviews" || row[2] != 12.5 || row[3] != float64(5) || row[4] != float64(100) {
		t.Errorf("row %v", row)
	}
}
