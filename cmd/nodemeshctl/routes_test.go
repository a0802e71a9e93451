package main

import (
	"encoding/json"
	"flag"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/runtime"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/l7/authz"
	l7mesh "github.com/nodemesh/nodemesh/agent/l7/mesh"
	l7v1alpha1 "github.com/nodemesh/nodemesh/agent/l7/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// routeObjects are the cluster's routes and TrafficPolicies for
// TestRoutesCommand: kind, then the object.
var routeObjects = []struct {
	gk  state.GroupKind
	doc string
}{
	{l7mesh.HTTPRouteKind, `
metadata: {name: reviews, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - name: canary
    matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: "true"}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs:
    - {name: reviews-v1, port: 80, weight: 90}
    - {name: reviews-v2, port: 80, weight: 10}
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: stable}]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: reviews-shadow, port: 80}, percent: 10}}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [502, 503], attempts: 2, backoff: 100ms}
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {scheme: https, hostname: shop.example.com, statusCode: 301}}
  - matches: [{path: {type: PathPrefix, value: /ext}}]
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: x}}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /elsewhere}}]
    backendRefs: [{name: reviews, namespace: other, port: 80}]
`},
	{l7mesh.HTTPRouteKind, `
metadata: {name: reviews-for-frontend, namespace: frontend, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, namespace: shop}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 80}]
`},
	{l7mesh.GRPCRouteKind, `
metadata: {name: ratings, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings}]
  rules:
  - matches: [{method: {service: ratings.v1.Ratings, method: Get}}]
    backendRefs: [{name: ratings-v2, port: 9090}]
  - backendRefs: [{name: ratings, port: 9090}]
`},
	{l7mesh.HTTPRouteKind, `
metadata: {name: api, namespace: legacy, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules:
  - backendRefs: [{name: api-v2, port: 8080}]
`},
	{l7mesh.TrafficPolicyKind, `
metadata: {name: chaos, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  fault: {delay: {percentage: 10, fixedDelay: 500ms}, abort: {percentage: 5, httpStatus: 503}}
  rateLimit: {requestsPerSecond: 100, burst: 200, perSource: true}
`},
	{l7mesh.TrafficPolicyKind, `
metadata: {name: chaos-too, namespace: shop, creationTimestamp: "2026-01-03T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  rateLimit: {requestsPerSecond: 1}
`},
	{l7mesh.TrafficPolicyKind, `
metadata: {name: empty, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: ratings}]
`},
}

// routesAgent serves an admin API whose /config_dump/l7 is the agent's own
// dump of routeObjects, compiled by the agent's code.
func routesAgent(t *testing.T) *httptest.Server {
	t.Helper()
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop", Labels: map[string]string{l7.LabelL7: l7.ValueEnabled}})
		tx.SetNamespace(&state.Namespace{Name: "legacy"})
		for _, k := range []state.Key{{Namespace: "shop", Name: "reviews"}, {Namespace: "shop", Name: "ratings"}, {Namespace: "legacy", Name: "api"}} {
			tx.SetService(&state.Service{Namespace: k.Namespace, Name: k.Name, Ports: []state.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"}}})
		}
		for _, o := range routeObjects {
			var typed any
			switch o.gk {
			case l7mesh.HTTPRouteKind:
				typed = &gwv1.HTTPRoute{}
			case l7mesh.GRPCRouteKind:
				typed = &gwv1.GRPCRoute{}
			default:
				typed = &l7v1alpha1.TrafficPolicy{}
			}
			if err := yaml.UnmarshalStrict([]byte(o.doc), typed); err != nil {
				t.Fatalf("%s: %v", o.doc, err)
			}
			content, err := runtime.DefaultUnstructuredConverter.ToUnstructured(typed)
			if err != nil {
				t.Fatal(err)
			}
			md := content["metadata"].(map[string]any)
			tx.SetObject(&state.Object{GroupKind: o.gk, Namespace: md["namespace"].(string), Name: md["name"].(string), Content: content})
		}
		// An object the agent cannot decode.
		tx.SetObject(&state.Object{GroupKind: l7mesh.HTTPRouteKind, Namespace: "shop", Name: "garbled",
			Content: map[string]any{"metadata": map[string]any{"name": "garbled", "namespace": "shop"}, "spec": map[string]any{"rules": "not a list"}}})
	})
	layer, err := l7mesh.New(l7mesh.Config{State: st.Snapshot,
		Authorize: func(*proxy.Flow, *authz.Request) proxy.Decision { return proxy.Decision{} }})
	if err != nil {
		t.Fatal(err)
	}
	routes, traffic := &l7mesh.Routes{}, &l7mesh.Traffic{}
	srv, err := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry(), Info: map[string]string{"node": "node-1"}})
	if err != nil {
		t.Fatal(err)
	}
	srv.AddDump("l7", func() any { return layer.Dump(st.Snapshot(), routes, traffic) })
	hs := httptest.NewServer(srv.AdminHandler())
	t.Cleanup(hs.Close)
	return hs
}

// TestRoutesCommand checks `nodemeshctl routes` against golden files
// (go test -update rewrites them), on a dump the agent's code compiled.
func TestRoutesCommand(t *testing.T) {
	hs := routesAgent(t)
	for _, tc := range []struct {
		golden string
		args   []string
	}{
		{"routes-all", nil},
		{"routes-service", []string{"shop/reviews"}},
		{"routes-grpc", []string{"shop/ratings"}},
		{"routes-not-opted-in", []string{"legacy/api"}},
		{"routes-none", []string{"shop/nothing"}},
		{"routes-service-json", []string{"shop/reviews", "-o", "json"}},
	} {
		out, errOut, code := ctl(t, append([]string{"routes", "--admin", hs.URL}, tc.args...)...)
		if code != 0 {
			t.Errorf("%s: exit %d: %s", tc.golden, code, errOut)
			continue
		}
		if strings.HasSuffix(tc.golden, "-json") && !json.Valid([]byte(out)) {
			t.Errorf("%s: not JSON:\n%s", tc.golden, out)
		}
		path := filepath.Join("testdata", tc.golden+".golden")
		if *update {
			if err := os.MkdirAll("testdata", 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("reading the golden file (run go test -update to create it): %v", err)
		}
		if out != string(want) {
			t.Errorf("%s: output differs from %s (run go test -update after checking):\n--- got\n%s\n--- want\n%s", tc.golden, path, out, want)
		}
	}
	// Usage errors exit 2 before anything is asked.
	for _, args := range [][]string{{"routes", "reviews"}, {"routes", "a/b/c"}, {"routes", "a/b", "c/d"}, {"routes", "-o", "xml"}} {
		if _, errOut, code := ctl(t, append(args, "--admin", hs.URL)...); code != 2 {
			t.Errorf("%v: exit %d, want 2 (stderr %q)", args, code, errOut)
		}
	}
	// An agent without the section says why.
	bare, err := admin.New(admin.Config{Level: new(slog.LevelVar), Gatherer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	hb := httptest.NewServer(bare.AdminHandler())
	defer hb.Close()
	if _, errOut, code := ctl(t, "routes", "--admin", hb.URL); code != 1 || !strings.Contains(errOut, "no L7 section") {
		t.Errorf("agent without L7: exit %d: %s", code, errOut)
	}
}
