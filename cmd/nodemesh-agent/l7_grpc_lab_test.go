package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
	"github.com/nodemesh/nodemesh/manifests"
)

// grpcService creates an opted-in Service on port 9090 with the given
// appProtocol ("" for none) and its EndpointSlice over pods (the lab plays
// the endpoints controller only for the Services of its spec).
func grpcService(ctx context.Context, t *testing.T, l *lab.Lab, name, appProtocol string, pods ...lab.Pod) string {
	t.Helper()
	c := l.Server.Client
	sp := corev1.ServicePort{Name: "grpc", Port: 9090, TargetPort: intstr.FromInt32(9090)}
	if appProtocol != "" {
		sp.AppProtocol = &appProtocol
	}
	svc, err := c.CoreV1().Services("shop").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", Labels: map[string]string{l7.LabelL7: l7.ValueEnabled}},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{sp}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	port, proto, ready, pname := int32(9090), corev1.ProtocolTCP, true, "grpc"
	var eps []discoveryv1.Endpoint
	for _, p := range pods {
		_, podName, _ := strings.Cut(p.Key(), "/")
		eps = append(eps, discoveryv1.Endpoint{Addresses: []string{p.IP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName: &p.Node, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: podName}})
	}
	if _, err := c.DiscoveryV1().EndpointSlices("shop").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Namespace: "shop", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port, Protocol: &proto}},
		Endpoints:   eps,
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return svc.Spec.ClusterIP + ":9090"
}

// TestLabL7GRPC runs gRPC through real agents: a gRPC server (the standard
// health service, h2c) in both web pods, reached from a client pod through
// Services that opted in to L7, one declaring appProtocol grpc and one
// declaring nothing (the HTTP/2 preface is detected). It checks that the
// source agent balances the calls of one HTTP/2 connection across both
// pods per request, that a GRPCRoute's method and header match sends calls
// to its backend, that the destination agent denies a call by an
// AuthorizationPolicy with gRPC's PERMISSION_DENIED while the next call on
// the same connection passes, and the request metrics' gRPC labels.
func TestLabL7GRPC(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	dyn, err := dynamic.NewForConfig(l.Server.REST)
	if err != nil {
		t.Fatal(err)
	}
	gatewayCRDs(ctx, t, dyn)
	crds, err := manifests.Render("../../manifests/crds")
	if err != nil {
		t.Fatal(err)
	}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{"shop", "client"} {
		setMode(t, ctx, l, ns, state.ModeEnabled)
	}
	web1, web2 := mustLabPod(t, l, "shop/web-1"), mustLabPod(t, l, "shop/web-2")

	// The gRPC servers run beside the pods' http workload, in the pods'
	// network namespaces and cgroups.
	srvCtx, stopServers := context.WithCancel(ctx)
	var servers sync.WaitGroup
	defer func() { stopServers(); servers.Wait() }()
	for _, p := range []lab.Pod{web1, web2} {
		servers.Add(1)
		go func() {
			defer servers.Done()
			var out strings.Builder
			err := l.ExecStream(srvCtx, p.Key(), []string{"nodemeshctl", "lab", "workload", "grpc", "--port", "9090"}, nil, &out, &out)
			if srvCtx.Err() == nil {
				t.Errorf("the grpc server in %s ended: %v: %s", p.Key(), err, out.String())
			}
		}()
	}
	declared := grpcService(ctx, t, l, "grpc", "grpc", web1, web2)
	detected := grpcService(ctx, t, l, "grpc-h2c", "", web1, web2)
	grpcService(ctx, t, l, "grpc-v2", "grpc", web2)

	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin, LogLevel: "debug",
		DrainDeadline: 5 * time.Second, CRDRecheck: time.Second, Wait: 3 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Stop(context.Background())
		for _, a := range m.Agents {
			dumpLog(t, a.Log)
		}
		for _, a := range m.Agents {
			if b, err := os.ReadFile(a.Log); err == nil && strings.Contains(string(b), "panic") {
				t.Errorf("an agent panicked; %s:\n%s", a.Log, tail(string(b), 20000))
			}
		}
	})

	check := func(addr string, n int, hdr ...string) ([]workload.GRPCResult, error) {
		args := []string{"nodemeshctl", "lab", "workload", "grpc-check", "--n", fmt.Sprint(n)}
		for _, h := range hdr {
			args = append(args, "--header", h)
		}
		out, err := l.Exec(ctx, "client/client-1", append(args, addr))
		if err != nil {
			return nil, fmt.Errorf("grpc-check %s: %w: %s", addr, err, out)
		}
		var rs []workload.GRPCResult
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			var r workload.GRPCResult
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				return nil, fmt.Errorf("%q: %w", line, err)
			}
			rs = append(rs, r)
		}
		if len(rs) != n {
			return nil, fmt.Errorf("%d results for %d calls: %s", len(rs), n, out)
		}
		return rs, nil
	}
	// Calls on one connection, balanced per call by the source agent: at
	// L4 one connection would reach one pod.
	for _, addr := range []string{declared, detected} {
		var rs []workload.GRPCResult
		waitfor.NoError(t, 90*time.Second, "gRPC through the mesh to "+addr, func() error {
			var err error
			rs, err = check(addr, 1)
			if err == nil && rs[0].Code != "OK" {
				err = fmt.Errorf("%+v", rs[0])
			}
			return err
		})
		rs, err := check(addr, 40)
		if err != nil {
			t.Fatal(err)
		}
		pods := map[string]int{}
		for _, r := range rs {
			if r.Code != "OK" || r.Status != "SERVING" {
				t.Fatalf("%s: call answered %+v", addr, r)
			}
			pods[r.Pod]++
		}
		t.Logf("%s: 40 calls on one connection answered by %v", addr, pods)
		if pods["shop/web-1"] == 0 || pods["shop/web-2"] == 0 {
			t.Errorf("%s: the calls of one connection all went to one pod (%v): not balanced per request", addr, pods)
		}
	}

	// A GRPCRoute: Health/Check with x-canary: true goes to grpc-v2
	// (web-2 only); other calls to the Service itself.
	gr := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte(`
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: grpc, port: 9090}
  rules:
  - matches:
    - method: {service: grpc.health.v1.Health, method: Check}
      headers: [{name: x-canary, value: "true"}]
    backendRefs:
    - {name: grpc-v2, port: 9090}
  - backendRefs:
    - {name: grpc, port: 9090}
`), &gr.Object); err != nil {
		t.Fatal(err)
	}
	grGVR := schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "grpcroutes"}
	waitfor.NoError(t, 60*time.Second, "GRPCRoute created", func() error {
		_, err := dyn.Resource(grGVR).Namespace("shop").Create(ctx, gr, metav1.CreateOptions{})
		return err
	})
	waitfor.NoError(t, 60*time.Second, "the GRPCRoute in force", func() error {
		rs, err := check(declared, 20, "x-canary=true")
		if err != nil {
			return err
		}
		for _, r := range rs {
			if r.Code != "OK" || r.Pod != "shop/web-2" {
				return fmt.Errorf("x-canary call answered %+v, want OK from shop/web-2", r)
			}
		}
		return nil
	})
	rs, err := check(declared, 40)
	if err != nil {
		t.Fatal(err)
	}
	pods := map[string]int{}
	for _, r := range rs {
		pods[r.Pod]++
	}
	if pods["shop/web-1"] == 0 || pods["shop/web-2"] == 0 {
		t.Errorf("calls without x-canary went to %v, want both pods (the route's second rule)", pods)
	}

	// L7 authorization of gRPC at the destination: calls with x-deny: yes
	// are denied (PERMISSION_DENIED, the connection kept), the rest pass.
	apRes := dyn.Resource(v1alpha1.AuthorizationPolicyResource).Namespace("shop")
	ap := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "grpc-deny", "namespace": "shop"},
		"spec": map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "web"}},
			"action":   "DENY",
			"rules": []any{map[string]any{
				"to":   []any{map[string]any{"operation": map[string]any{"paths": []any{"/grpc.health.v1.Health/*"}}}},
				"when": []any{map[string]any{"key": "request.headers[x-deny]", "values": []any{"yes"}}},
			}},
		},
	}}
	if _, err := apRes.Create(ctx, ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitfor.NoError(t, 60*time.Second, "the DENY policy in force for gRPC", func() error {
		rs, err := check(detected, 4, "x-deny=yes")
		if err != nil {
			return err
		}
		for _, r := range rs {
			if r.Code != "PermissionDenied" || r.Message != "RBAC: access denied" {
				return fmt.Errorf("denied call answered %+v, want PermissionDenied RBAC: access denied", r)
			}
		}
		return nil
	})
	if rs, err := check(detected, 3, "x-deny=no"); err != nil {
		t.Fatal(err)
	} else {
		for _, r := range rs {
			if r.Code != "OK" {
				t.Errorf("a call the policy allows answered %+v", r)
			}
		}
	}

	// Request metrics: gRPC calls are request_protocol="grpc" with the
	// gRPC status, from both reporters.
	waitfor.NoError(t, 20*time.Second, "gRPC request metrics", func() error {
		var all []string
		for _, node := range []string{"node-1", "node-2"} {
			n, _ := l.Node(node)
			_, m, err := httpGet(nodeClient(n), "http://127.0.0.1:15020/metrics")
			if err != nil {
				return err
			}
			all = append(all, grep(m, "istio_requests_total{"))
		}
		lines := strings.Join(all, "\n")
		for _, want := range [][]string{
			{`reporter="source"`, `request_protocol="grpc"`, `grpc_response_status="0"`, `destination_service_name="grpc"`},
			{`reporter="destination"`, `request_protocol="grpc"`, `grpc_response_status="7"`, `response_flags="RBAC"`},
		} {
			found := false
			for _, line := range strings.Split(lines, "\n") {
				ok := true
				for _, w := range want {
					ok = ok && strings.Contains(line, w)
				}
				found = found || ok
			}
			if !found {
				return fmt.Errorf("no istio_requests_total series with %q in:\n%s", want, lines)
			}
		}
		return nil
	})
}
