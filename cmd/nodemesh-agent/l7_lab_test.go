package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/l7"
	l7v1alpha1 "github.com/nodemesh/nodemesh/agent/l7/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
	"github.com/nodemesh/nodemesh/manifests"
)

// requests runs the requests workload in pod from: the URLs in order on
// one kept-alive connection.
func requests(ctx context.Context, t *testing.T, l *lab.Lab, from string, urls ...string) []workload.Result {
	t.Helper()
	out, err := l.Exec(ctx, from, append([]string{"nodemeshctl", "lab", "workload", "requests"}, urls...))
	if err != nil {
		t.Fatalf("requests from %s: %v\n%s", from, err, out)
	}
	var rs []workload.Result
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r workload.Result
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("decoding %q: %v", sc.Text(), err)
		}
		rs = append(rs, r)
	}
	if len(rs) != len(urls) {
		t.Fatalf("%d results for %d URLs:\n%s", len(rs), len(urls), out)
	}
	return rs
}

// TestLabL7 runs L7 through real agents in the two-node lab: the shop/web
// Service opts in to L7 and an AuthorizationPolicy with L7 fields lets
// client pods GET /public/* only. Requests from client pods, through the
// source agent's per-request routing and the destination agent's
// per-request authorization, are decided on the normalised path exactly as
// the application sees it; a denied request gets 403 and the next request
// goes on the same connection.
func TestLabL7(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	c := l.Server.Client
	dyn, err := dynamic.NewForConfig(l.Server.REST)
	if err != nil {
		t.Fatal(err)
	}
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
	svc, err := l.Service("shop/web")
	if err != nil {
		t.Fatal(err)
	}
	web2 := mustLabPod(t, l, "shop/web-2")
	base := fmt.Sprintf("http://%s:80", svc.ClusterIP)

	// Before anything opts in, the Service is L4: /admin is served.
	waitfor.NoError(t, 90*time.Second, "mesh traffic to shop/web", func() error {
		rs := requests(ctx, t, l, "client/client-1", base+"/admin")
		if rs[0].Status != 200 {
			return fmt.Errorf("%+v", rs[0])
		}
		return nil
	})

	// The policy: client pods may GET /public/*; the kubelet's probes
	// (plaintext from the node) are exempt as always.
	apRes := dyn.Resource(v1alpha1.AuthorizationPolicyResource).Namespace("shop")
	ap := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "web-public", "namespace": "shop"},
		"spec": map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "web"}},
			"rules": []any{map[string]any{
				"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{"client"}}}},
				"to":   []any{map[string]any{"operation": map[string]any{"methods": []any{"GET"}, "paths": []any{"/public/*"}}}},
			}},
		},
	}}
	if _, err := apRes.Create(ctx, ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Not opted in yet: the ALLOW rule has L7 fields the agents cannot
	// check on an L4 connection, so it matches nothing (fail closed).
	waitfor.NoError(t, 60*time.Second, "the L7 rule to fail closed at L4", func() error {
		rs := requests(ctx, t, l, "client/client-1", base+"/public/a")
		if rs[0].Error == "" {
			return fmt.Errorf("an L7-only ALLOW rule allowed an L4 connection: %+v", rs[0])
		}
		return nil
	})

	// Opt the Service in.
	s, err := c.CoreV1().Services("shop").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Labels == nil {
		s.Labels = map[string]string{}
	}
	s.Labels[l7.LabelL7] = l7.ValueEnabled
	if _, err := c.CoreV1().Services("shop").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitfor.NoError(t, 60*time.Second, "L7 authorization of shop/web", func() error {
		rs := requests(ctx, t, l, "client/client-1", base+"/public/a")
		if rs[0].Status != 200 {
			return fmt.Errorf("%+v", rs[0])
		}
		return nil
	})

	type want struct {
		path   string
		status int
		seen   string // the path the application saw, for 200s
	}
	cases := []want{
		{"/public/a", 200, "/public/a"},
		{"/admin", 403, ""},
		{"/public/b", 200, "/public/b"},
		{"/public/../admin", 403, ""},
		{"/public//x/./y", 200, "/public/x/y"},
		{"/public/%2e%2e/admin", 403, ""},
		{"/public/%2Fadmin", 400, ""},
		{"/public/a%5C..%5Cadmin", 400, ""},
		{"/public;x/a", 403, ""},
		{"/PUBLIC/a", 403, ""},
		{"/public/c?x=/admin", 200, "/public/c?x=/admin"},
	}
	for _, from := range []string{"client/client-1", "client/client-2"} {
		var urls []string
		for _, c := range cases {
			urls = append(urls, base+c.path)
		}
		// And by pod IP: the source agent does not route it, the
		// destination agent still authorises every request.
		urls = append(urls, "http://"+web2.IP+":8080/admin", "http://"+web2.IP+":8080/public/z")
		rs := requests(ctx, t, l, from, urls...)
		for _, r := range rs {
			t.Logf("%s: GET %s -> %d reused=%v %.60q %s", from, r.URL, r.Status, r.Reused, r.Body, r.Error)
		}
		for i, c := range cases {
			r := rs[i]
			if r.Status != c.status {
				t.Errorf("%s GET %s: status %d (%s%s), want %d", from, c.path, r.Status, r.Body, r.Error, c.status)
				continue
			}
			if i > 0 && !r.Reused {
				t.Errorf("%s GET %s went on a new connection: the previous answer (%d) closed it", from, c.path, rs[i-1].Status)
			}
			if c.status == 403 && r.Body != "RBAC: access denied\n" {
				t.Errorf("%s GET %s: 403 body %q", from, c.path, r.Body)
			}
			if c.status == 200 {
				var reply workload.Reply
				if err := json.Unmarshal([]byte(r.Body), &reply); err != nil {
					t.Errorf("%s GET %s: %v: %q", from, c.path, err, r.Body)
					continue
				}
				if reply.Path != c.seen {
					t.Errorf("%s GET %s: the application saw %q, authorization decided on %q", from, c.path, reply.Path, c.seen)
				}
			}
		}
		if n := len(cases); rs[n].Status != 403 || rs[n+1].Status != 200 {
			t.Errorf("%s by pod IP: /admin %d %s, /public/z %d %s; want 403 and 200", from, rs[n].Status, rs[n].Error, rs[n+1].Status, rs[n+1].Error)
		}
	}

	// Istio's request metrics from both reporters, and the access log.
	series := func(node string, want ...string) error {
		n, _ := l.Node(node)
		_, m, err := httpGet(nodeClient(n), "http://127.0.0.1:15020/metrics")
		if err != nil {
			return err
		}
		lines := grep(m, "istio_requests_total{")
		for _, line := range strings.Split(lines, "\n") {
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(line, w)
			}
			if ok {
				return nil
			}
		}
		return fmt.Errorf("%s: no istio_requests_total series with %q in:\n%s", node, want, lines)
	}
	common := []string{`request_protocol="http"`, `connection_security_policy="mutual_tls"`,
		`destination_service="web.shop.svc.cluster.local"`, `destination_service_name="web"`,
		`source_principal="spiffe://cluster.local/ns/client/sa/client"`, `destination_principal="spiffe://cluster.local/ns/shop/sa/web"`,
		`source_workload="client-2"`, `source_workload_namespace="client"`, `destination_workload_namespace="shop"`}
	waitfor.NoError(t, 20*time.Second, "request metrics", func() error {
		// client-2 is on node-2: its agent reports as source; the
		// destination is web-1 (node-1's agent reports it) or web-2
		// (node-2's): the Service balances client-2's few requests, and
		// all of them may land on one backend.
		either := func(extra ...string) error {
			err1 := series("node-2", append(append(common, `reporter="source"`, `destination_workload="web-1"`), extra...)...)
			if err1 == nil {
				return nil
			}
			if err2 := series("node-2", append(append(common, `reporter="source"`, `destination_workload="web-2"`), extra...)...); err2 != nil {
				return fmt.Errorf("%v\nnor to web-2", err1)
			}
			return nil
		}
		if err := either(`response_code="200"`, `response_flags="-"`); err != nil {
			return err
		}
		if err := either(`response_code="403"`); err != nil {
			return err
		}
		err1 := series("node-1", append(common, `reporter="destination"`, `response_code="403"`, `response_flags="RBAC"`, `destination_workload="web-1"`)...)
		if err1 == nil {
			return nil
		}
		if err2 := series("node-2", append(common, `reporter="destination"`, `response_code="403"`, `response_flags="RBAC"`, `destination_workload="web-2"`)...); err2 != nil {
			return fmt.Errorf("%v\nnor at web-2: %v", err1, err2)
		}
		return nil
	})
	for _, node := range []string{"node-1", "node-2"} {
		n, _ := l.Node(node)
		_, m, err := httpGet(nodeClient(n), "http://127.0.0.1:15020/metrics")
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"istio_request_duration_milliseconds_bucket{", "istio_request_bytes_bucket{", "istio_response_bytes_bucket{"} {
			if !strings.Contains(m, name) {
				t.Errorf("%s exports no %s", node, name)
			}
		}
	}
	waitfor.NoError(t, 20*time.Second, "a request in the access log", func() error {
		b, err := os.ReadFile(m.Agents["node-1"].Log)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != "request" {
				continue
			}
			if rec["reporter"] == "destination" && rec["status"] == float64(403) && rec["path"] == "/admin" && rec["response_flags"] == "RBAC" {
				return nil
			}
		}
		return fmt.Errorf("no access log record of a denied request")
	})

	// TrafficPolicy: an abort for every request, at the source agent.
	tpRes := dyn.Resource(l7v1alpha1.TrafficPolicyResource).Namespace("shop")
	tp := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "traffic.nodemesh.io/v1alpha1", "kind": "TrafficPolicy",
		"metadata": map[string]any{"name": "web", "namespace": "shop"},
		"spec": map[string]any{
			"targetRefs": []any{map[string]any{"group": "", "kind": "Service", "name": "web"}},
			"fault":      map[string]any{"abort": map[string]any{"percentage": 100, "httpStatus": 418}},
		},
	}}
	if _, err := tpRes.Create(ctx, tp, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitfor.NoError(t, 60*time.Second, "fault injection on shop/web", func() error {
		rs := requests(ctx, t, l, "client/client-1", base+"/public/f", base+"/public/g")
		for _, r := range rs {
			if r.Status != 418 || !strings.Contains(r.Body, "fault filter abort") {
				return fmt.Errorf("%+v", r)
			}
		}
		return nil
	})
	// Then a rate limit instead: 1 request per second, bursts of 2, per
	// client agent.
	got, err := tpRes.Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got.Object["spec"] = map[string]any{
		"targetRefs": []any{map[string]any{"group": "", "kind": "Service", "name": "web"}},
		"rateLimit":  map[string]any{"requestsPerSecond": 1, "burst": 2},
	}
	if _, err := tpRes.Update(ctx, got, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitfor.NoError(t, 60*time.Second, "the rate limit on shop/web", func() error {
		var urls []string
		for range 8 {
			urls = append(urls, base+"/public/r")
		}
		rs := requests(ctx, t, l, "client/client-1", urls...)
		ok, limited := 0, 0
		for _, r := range rs {
			switch {
			case r.Status == 200:
				ok++
			case r.Status == 429 && strings.Contains(r.Body, "local rate limited"):
				limited++
			default:
				return fmt.Errorf("unexpected answer %+v", r)
			}
		}
		// The bucket holds 2; 8 requests in well under 3 s get at most
		// 2 + the refills.
		if limited == 0 || ok > 4 {
			return fmt.Errorf("%d allowed, %d limited: the limit does not hold", ok, limited)
		}
		t.Logf("rate limit: %d allowed, %d answered 429", ok, limited)
		return nil
	})
	if err := tpRes.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}
