package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// gatewayCRDs installs the Gateway API's HTTPRoute and GRPCRoute CRDs from
// the sigs.k8s.io/gateway-api module the agent is built with, from the
// experimental channel: in v1.4 the standard channel's schema has no
// HTTPRoute retry field, and the API server prunes it.
func gatewayCRDs(ctx context.Context, t *testing.T, dyn dynamic.Interface) {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/gateway-api").Output()
	if err != nil {
		t.Fatalf("finding the gateway-api module: %v", err)
	}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, f := range []string{"gateway.networking.k8s.io_httproutes.yaml", "gateway.networking.k8s.io_grpcroutes.yaml"} {
		b, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "config", "crd", "experimental", f))
		if err != nil {
			t.Fatal(err)
		}
		var obj map[string]any
		if err := yaml.Unmarshal(b, &obj); err != nil {
			t.Fatal(err)
		}
		if _, err := dyn.Resource(crdGVR).Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// podService creates a Service for one lab pod, with its EndpointSlice
// (the lab plays the endpoints controller only for the Services of its
// spec).
func podService(ctx context.Context, t *testing.T, l *lab.Lab, name string, p lab.Pod) {
	t.Helper()
	c := l.Server.Client
	ns, podName, _ := strings.Cut(p.Key(), "/")
	if _, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	port, proto, ready, pname := int32(8080), corev1.ProtocolTCP, true, "http"
	if _, err := c.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port, Protocol: &proto}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{p.IP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName: &p.Node, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: podName}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// routingLab brings up the two-node lab with the Gateway API CRDs, the
// shop and client namespaces enrolled, the Services web-v1 (shop/web-1) and
// web-v2 (shop/web-2) and shop/web opted in to L7, and the agents; it
// returns the lab, a dynamic client and the base URL of shop/web.
func routingLab(ctx context.Context, t *testing.T) (*lab.Lab, dynamic.Interface, string) {
	t.Helper()
	l := labtest.TwoNodes(t)
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	dyn, err := dynamic.NewForConfig(l.Server.REST)
	if err != nil {
		t.Fatal(err)
	}
	gatewayCRDs(ctx, t, dyn)
	for _, ns := range []string{"shop", "client"} {
		setMode(t, ctx, l, ns, state.ModeEnabled)
	}
	web1, web2 := mustLabPod(t, l, "shop/web-1"), mustLabPod(t, l, "shop/web-2")
	podService(ctx, t, l, "web-v1", web1)
	podService(ctx, t, l, "web-v2", web2)
	c := l.Server.Client
	s, err := c.CoreV1().Services("shop").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Labels = map[string]string{l7.LabelL7: l7.ValueEnabled}
	if _, err := c.CoreV1().Services("shop").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
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
	})
	svc, err := l.Service("shop/web")
	if err != nil {
		t.Fatal(err)
	}
	base := fmt.Sprintf("http://%s:80", svc.ClusterIP)
	return l, dyn, base
}

// createHTTPRoute creates an HTTPRoute from YAML (retrying while the API
// server learns the CRD).
func createHTTPRoute(ctx context.Context, t *testing.T, dyn dynamic.Interface, doc string) {
	t.Helper()
	hr := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte(doc), &hr.Object); err != nil {
		t.Fatal(err)
	}
	hrGVR := schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}
	waitfor.NoError(t, 60*time.Second, "HTTPRoute created", func() error {
		_, err := dyn.Resource(hrGVR).Namespace(hr.GetNamespace()).Create(ctx, hr, metav1.CreateOptions{})
		return err
	})
}

// TestLabL7Routing routes through real agents with a Gateway API HTTPRoute
// attached to the shop/web Service (GAMMA): a weighted canary split
// measured over many requests, a header match, a request header modifier,
// and a 404 when routes are attached but none matches.
func TestLabL7Routing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	l, dyn, base := routingLab(ctx, t)

	createHTTPRoute(ctx, t, dyn, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: web, port: 80}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: "true"}]
    backendRefs:
    - {name: web-v2, port: 80}
  - matches:
    - path: {type: PathPrefix, value: /api}
    backendRefs:
    - {name: web-v1, port: 80, weight: 80}
    - {name: web-v2, port: 80, weight: 20}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: split}]
  - matches:
    - path: {type: PathPrefix, value: /retry}
    backendRefs:
    - {name: web, port: 80}
    retry: {codes: [503], attempts: 3, backoff: 10ms}
  - matches:
    - path: {type: PathPrefix, value: /slow}
    backendRefs:
    - {name: web, port: 80}
    timeouts: {request: 300ms}
  - matches:
    - path: {type: PathPrefix, value: /noretry}
    backendRefs:
    - {name: web, port: 80}
  - matches:
    - path: {type: PathPrefix, value: /outage}
    backendRefs:
    - {name: web, port: 80}
    retry: {codes: [503], attempts: 3, backoff: 10ms}
`)
	waitfor.NoError(t, 90*time.Second, "the route in force (404 outside /api)", func() error {
		rs := requests(ctx, t, l, "client/client-1", base+"/other")
		if rs[0].Status != 404 {
			return fmt.Errorf("%+v", rs[0])
		}
		return nil
	})

	var urls []string
	for range 100 {
		urls = append(urls, base+"/api/split")
	}
	counts := map[string]int{}
	for _, r := range requests(ctx, t, l, "client/client-1", urls...) {
		var reply workload.Reply
		if r.Status != 200 || json.Unmarshal([]byte(r.Body), &reply) != nil {
			t.Fatalf("split request: %+v", r)
		}
		if reply.Header.Get("X-Route") != "split" {
			t.Errorf("the request header modifier did not apply: %v", reply.Header)
		}
		counts[reply.Pod]++
	}
	t.Logf("canary split over 100 requests: %v", counts)
	// 80/20: the chance of fewer than 65 or more than 95 on web-1 is below 1e-4.
	if counts["shop/web-1"] < 65 || counts["shop/web-1"] > 95 || counts["shop/web-1"]+counts["shop/web-2"] != 100 {
		t.Errorf("split %v, want about 80 web-1 / 20 web-2", counts)
	}
	// The header match sends everything to web-v2.
	out, err := l.Exec(ctx, "client/client-1", []string{"nodemeshctl", "lab", "workload", "requests", "--header", "x-canary=true",
		base + "/api/c1", base + "/api/c2", base + "/api/c3", base + "/api/c4", base + "/api/c5"})
	if err != nil {
		t.Fatalf("canary requests: %v: %s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var r workload.Result
		var reply workload.Reply
		if json.Unmarshal([]byte(line), &r) != nil || json.Unmarshal([]byte(r.Body), &reply) != nil || reply.Pod != "shop/web-2" {
			t.Fatalf("x-canary: true answered %q, want shop/web-2", line)
		}
	}

	// Retries hide a 503: each pod fails a key once, so with 3 retries
	// every request succeeds; without the retry stanza the first failure
	// reaches the client.
	one := func(hdr, url string) workload.Result {
		t.Helper()
		out, err := l.Exec(ctx, "client/client-1", []string{"nodemeshctl", "lab", "workload", "requests", "--header", hdr, url})
		if err != nil {
			t.Fatalf("%s: %v: %s", url, err, out)
		}
		var r workload.Result
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("%s: %q: %v", url, out, err)
		}
		return r
	}
	for i := range 5 {
		if r := one(fmt.Sprintf("%s=retry-%d", workload.HeaderFailOnce, i), base+"/retry"); r.Status != 200 {
			t.Errorf("retried request %d: %d %s%s, want 200 (the retry hides the 503)", i, r.Status, r.Body, r.Error)
		}
	}
	if r := one(workload.HeaderFailOnce+"=noretry", base+"/noretry"); r.Status != 503 {
		t.Errorf("request without retries: %d %s, want the backend's 503", r.Status, r.Body)
	}
	// The route's request timeout fires: 504.
	start := time.Now()
	if r := one(workload.HeaderDelay+"=3s", base+"/slow"); r.Status != 504 || !strings.Contains(r.Body, "upstream request timeout") {
		t.Errorf("slow request: %d %q, want 504 upstream request timeout", r.Status, r.Body)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Errorf("the 300ms timeout answered after %s", d)
	}
	if r := one(workload.HeaderDelay+"=100ms", base+"/slow"); r.Status != 200 {
		t.Errorf("request within the timeout: %d %s", r.Status, r.Body)
	}

	retryBudgetOutage(ctx, t, l, base)
}

// retryBudgetOutage proves through real agents that retries cannot
// multiply load when every backend fails: both web pods answer 503 to
// everything (X-Workload-Status), and the route allows 3 retries. The
// attempts the backends received are counted by the destination agents
// (istio_requests_total, reporter="destination"), the requests the client
// made by the source agent (reporter="source").
func retryBudgetOutage(ctx context.Context, t *testing.T, l *lab.Lab, base string) {
	t.Helper()
	count := func(reporter string) int {
		t.Helper()
		total := 0
		for _, node := range []string{"node-1", "node-2"} {
			n, _ := l.Node(node)
			_, m, err := httpGet(nodeClient(n), "http://127.0.0.1:15020/metrics")
			if err != nil {
				t.Fatalf("metrics of %s: %v", node, err)
			}
			for _, line := range strings.Split(grep(m, "istio_requests_total{"), "\n") {
				if !strings.Contains(line, `reporter="`+reporter+`"`) || !strings.Contains(line, `response_code="503"`) ||
					!strings.Contains(line, `destination_service_name="web"`) {
					continue
				}
				f := strings.Fields(line)
				v, err := strconv.ParseFloat(f[len(f)-1], 64)
				if err != nil {
					t.Fatalf("%s: %q: %v", node, line, err)
				}
				total += int(v)
			}
		}
		return total
	}
	// The counters settle once the answers are out; wait until both
	// reporters have counted what was sent.
	settled := func(wantSrc int, src0 int) (src, dst int) {
		t.Helper()
		waitfor.NoError(t, 20*time.Second, "request metrics", func() error {
			src, dst = count("source"), count("destination")
			if src-src0 < wantSrc {
				return fmt.Errorf("source counted %d of %d requests", src-src0, wantSrc)
			}
			return nil
		})
		time.Sleep(500 * time.Millisecond) // a destination count a beat behind
		return count("source"), count("destination")
	}
	run := func(parallel, n int) []workload.Result {
		t.Helper()
		args := []string{"nodemeshctl", "lab", "workload", "requests", "--timeout", "60s", "--parallel", strconv.Itoa(parallel),
			"--header", workload.HeaderStatus + "=503", "--header", workload.HeaderDelay + "=50ms"}
		for range n {
			args = append(args, base+"/outage")
		}
		out, err := l.Exec(ctx, "client/client-1", args)
		if err != nil {
			t.Fatalf("outage requests: %v: %s", err, tail(string(out), 2000))
		}
		var rs []workload.Result
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			var r workload.Result
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			if r.Status != 503 {
				t.Errorf("outage request: %d %s%s, want the backend's 503", r.Status, r.Body, r.Error)
			}
			rs = append(rs, r)
		}
		return rs
	}
	src0, dst0 := count("source"), count("destination")
	// One at a time, the budget's minimum (3 retries in flight) lets
	// every retry through: 4 attempts per request. This shows the retries
	// are made and counted.
	run(1, 4)
	src1, dst1 := settled(4, src0)
	t.Logf("outage, one request at a time: %d requests, %d attempts at the backends", src1-src0, dst1-dst0)
	if src1-src0 != 4 || dst1-dst0 != 16 {
		t.Errorf("one at a time: %d requests made %d attempts, want 4 and 16 (3 retries each)", src1-src0, dst1-dst0)
	}
	// 20 at a time, 200 requests: retries in flight are capped at 20% of
	// the requests in flight (4), so the backends get about 1.25 attempts
	// per request, not 4.
	const n = 200
	run(20, n)
	src2, dst2 := settled(n, src1)
	reqs, atts := src2-src1, dst2-dst1
	ratio := float64(atts) / float64(reqs)
	t.Logf("outage, 20 in flight: %d requests, %d attempts at the backends (%.2f per request; 4 without the budget)", reqs, atts, ratio)
	if reqs != n {
		t.Errorf("the source agent counted %d requests, want %d", reqs, n)
	}
	if ratio > 1.5 || atts <= reqs {
		t.Errorf("%d attempts for %d requests (%.2f each): want more than 1 and at most 1.5 under the retry budget", atts, reqs, ratio)
	}
}
