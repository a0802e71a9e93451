package route

import (
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

func httpRoute(t testing.TB, doc string) *gwv1.HTTPRoute {
	t.Helper()
	var hr gwv1.HTTPRoute
	if err := yaml.UnmarshalStrict([]byte(doc), &hr); err != nil {
		t.Fatalf("decoding HTTPRoute: %v", err)
	}
	return &hr
}

func grpcRoute(t testing.TB, doc string) *gwv1.GRPCRoute {
	t.Helper()
	var gr gwv1.GRPCRoute
	if err := yaml.UnmarshalStrict([]byte(doc), &gr); err != nil {
		t.Fatalf("decoding GRPCRoute: %v", err)
	}
	return &gr
}

var reviews = ServiceKey{"shop", "reviews"}

// matchesRoute is a producer route with one rule per kind of match; each
// rule's backend names the rule, so a test can tell which rule matched.
const matchesRoute = `
metadata: {name: matches, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/}}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2}}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: api-post, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: "true"}]}]
    backendRefs: [{name: api-canary, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "true"}, {name: x-user, type: RegularExpression, value: "a.*"}]}]
    backendRefs: [{name: api-canary-a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: v, value: "3"}]}]
    backendRefs: [{name: api-q, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
    backendRefs: [{name: re, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: root, port: 80}]
`

func TestMatch(t *testing.T) {
	tbl := Compile([]*gwv1.HTTPRoute{httpRoute(t, matchesRoute)}, nil)
	if p := tbl.Problems(); len(p) != 0 {
		t.Fatalf("problems: %v", p)
	}
	for _, tc := range []struct {
		method, target string
		headers        map[string][]string
		want           string
	}{
		{"GET", "/exact", nil, "exact"},
		{"GET", "/exact/", nil, "root"},
		{"GET", "/exactly", nil, "root"},
		{"GET", "/api", nil, "api"},
		{"GET", "/api/", nil, "api"},
		{"GET", "/api/x", nil, "api"},
		{"GET", "/apix", nil, "root"}, // prefixes match whole segments
		{"GET", "/api/v2", nil, "api-v2"},
		{"GET", "/api/v2/x", nil, "api-v2"},
		{"GET", "/api/v22", nil, "api"},
		{"POST", "/api/x", nil, "api-post"},
		{"POST", "/api/v2/x", nil, "api-v2"}, // longer prefix beats method
		{"GET", "/api/x", map[string][]string{"X-Canary": {"true"}}, "api-canary"},
		{"GET", "/api/x", map[string][]string{"X-Canary": {"TRUE"}}, "api"}, // values are case-sensitive
		{"GET", "/api/x", map[string][]string{"X-Canary": {"true"}, "X-User": {"alice"}}, "api-canary-a"},
		{"GET", "/api/x", map[string][]string{"X-Canary": {"true"}, "X-User": {"bob"}}, "api-canary"},
		{"POST", "/api/x", map[string][]string{"X-Canary": {"true"}}, "api-post"}, // method beats headers
		{"GET", "/api/x?v=3", nil, "api-q"},
		{"GET", "/api/x?v=3&v=4", nil, "api-q"}, // first value counts
		{"GET", "/api/x?v=4&v=3", nil, "api"},
		{"GET", "/api/x?V=3", nil, "api"}, // names are case-sensitive
		{"GET", "/re/123", nil, "re"},
		{"GET", "/re/123x", nil, "root"}, // regular expressions match the whole path
		{"GET", "/", nil, "root"},
	} {
		r := httptest.NewRequest(tc.method, tc.target, nil)
		for k, vs := range tc.headers {
			r.Header[k] = vs
		}
		res := tbl.Match(reviews, 80, "shop", r)
		if !res.Attached || res.Rule == nil {
			t.Errorf("%s %s: no match (%+v)", tc.method, tc.target, res)
			continue
		}
		if got := string(res.Rule.Backends[0].Service.Name); got != tc.want {
			t.Errorf("%s %s %v: matched %s, want %s", tc.method, tc.target, tc.headers, got, tc.want)
		}
	}
}

func TestMatchAttachment(t *testing.T) {
	producer := httpRoute(t, `
metadata: {name: p, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /only}}]
    backendRefs: [{name: producer, port: 80}]
`)
	consumer := httpRoute(t, `
metadata: {name: c, namespace: frontend}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews, namespace: shop}]
  rules:
  - backendRefs: [{name: consumer, port: 80}]
`)
	gateway := httpRoute(t, `
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{name: my-gateway}]
  rules:
  - backendRefs: [{name: gw, port: 80}]
`)
	tbl := Compile([]*gwv1.HTTPRoute{producer, consumer, gateway}, nil)
	get := func(path string) *http.Request { return httptest.NewRequest("GET", path, nil) }
	for _, tc := range []struct {
		name     string
		svc      ServiceKey
		port     uint16
		clientNS string
		path     string
		attached bool
		want     string // backend name; "" for 404
	}{
		{"producer route for any client", reviews, 80, "other", "/only/x", true, "producer"},
		{"producer route: no rule matches is 404", reviews, 80, "other", "/else", true, ""},
		{"producer route only on its port", reviews, 8080, "other", "/only", false, ""},
		{"consumer route wins for its namespace", reviews, 80, "frontend", "/only", true, "consumer"},
		{"consumer route without port covers every port", reviews, 8080, "frontend", "/x", true, "consumer"},
		{"no route for another service", ServiceKey{"shop", "ratings"}, 80, "frontend", "/", false, ""},
		{"gateway routes are not mesh routes", ServiceKey{"shop", "my-gateway"}, 80, "shop", "/", false, ""},
	} {
		res := tbl.Match(tc.svc, tc.port, tc.clientNS, get(tc.path))
		got := ""
		if res.Rule != nil {
			got = res.Rule.Backends[0].Service.Name
		}
		if res.Attached != tc.attached || got != tc.want {
			t.Errorf("%s: attached=%v backend=%q, want attached=%v backend=%q", tc.name, res.Attached, got, tc.attached, tc.want)
		}
	}
}

func TestPrecedenceAcrossRoutes(t *testing.T) {
	older := httpRoute(t, `
metadata: {name: z-older, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules: [{backendRefs: [{name: older, port: 80}]}]
`)
	newer := httpRoute(t, `
metadata: {name: a-newer, namespace: shop, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules: [{backendRefs: [{name: newer, port: 80}]}]
`)
	sameAge := httpRoute(t, `
metadata: {name: a-same, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules: [{backendRefs: [{name: same, port: 80}]}]
`)
	r := httptest.NewRequest("GET", "/", nil)
	if got := Compile([]*gwv1.HTTPRoute{newer, older}, nil).Match(reviews, 80, "shop", r).Rule.Backends[0].Service.Name; got != "older" {
		t.Errorf("equal matches: %s won, want the oldest route", got)
	}
	if got := Compile([]*gwv1.HTTPRoute{older, sameAge}, nil).Match(reviews, 80, "shop", r).Rule.Backends[0].Service.Name; got != "same" {
		t.Errorf("equal age: %s won, want the first by namespace/name", got)
	}
}

func TestRuleSettings(t *testing.T) {
	hr := httpRoute(t, `
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - name: main
    backendRefs:
    - name: v1
      port: 80
      weight: 90
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {add: [{name: x-backend, value: v1}]}
    - {name: v2, port: 80, weight: 10}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: main}]
        add: [{name: x-added, value: "1"}]
        remove: [x-debug]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-served-by, value: nodemesh}]}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [502, 503], attempts: 2, backoff: 100ms}
`)
	tbl := Compile([]*gwv1.HTTPRoute{hr}, nil)
	if p := tbl.Problems(); len(p) != 0 {
		t.Fatalf("problems: %v", p)
	}
	rule := tbl.Match(reviews, 80, "shop", httptest.NewRequest("GET", "/", nil)).Rule
	if rule.Name != "main" || rule.RequestTimeout != 10*time.Second || rule.BackendTimeout != 2*time.Second {
		t.Errorf("rule = %+v", rule)
	}
	if rp := rule.Retry; rp == nil || rp.Attempts != 2 || rp.Backoff != 100*time.Millisecond || !rp.RetryOn(503) || rp.RetryOn(500) {
		t.Errorf("retry = %+v", rule.Retry)
	}
	h := http.Header{"X-Debug": {"1"}, "X-Route": {"old", "older"}, "X-Added": {"0"}}
	rule.RequestHeaders.Apply(h)
	if got := h.Values("X-Route"); len(got) != 1 || got[0] != "main" {
		t.Errorf("X-Route = %v", got)
	}
	if got := h.Values("X-Added"); len(got) != 2 {
		t.Errorf("X-Added = %v, want the old and the added value", got)
	}
	if _, ok := h["X-Debug"]; ok {
		t.Error("X-Debug not removed")
	}
	if be := rule.Backends[0]; be.RequestHeaders.Add[0] != (Header{"X-Backend", "v1"}) {
		t.Errorf("backend filter = %+v", be.RequestHeaders)
	}
	// Weighted pick: exact with a counting source, and roughly 90/10 at random.
	counts := map[string]int{}
	for n := range 100 {
		counts[rule.Pick(func(total int) int { return n % total }).Service.Name]++
	}
	if counts["v1"] != 90 || counts["v2"] != 10 {
		t.Errorf("deterministic pick over 100: %v, want v1:90 v2:10", counts)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	counts = map[string]int{}
	for range 10000 {
		counts[rule.Pick(rng.IntN).Service.Name]++
	}
	if counts["v2"] < 800 || counts["v2"] > 1200 {
		t.Errorf("random pick over 10000: %v, want about 1000 for v2", counts)
	}
}

func TestRefusedParts(t *testing.T) {
	hr := httpRoute(t, `
metadata: {name: bad, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /rewrite}}]
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: x}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /timeout}}]
    timeouts: {request: 1s, backendRequest: 2s}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /backends}}]
    backendRefs:
    - {name: ok, port: 80, weight: 1}
    - {name: other-ns, namespace: elsewhere, port: 80, weight: 1}
    - {name: noport, weight: 1}
    - {name: bucket, kind: S3Bucket, group: example.com, port: 80, weight: 1}
  - matches: [{path: {type: PathPrefix, value: /zero}}]
    backendRefs: [{name: a, port: 80, weight: 0}]
  - matches: [{path: {type: RegularExpression, value: "("}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /host}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Host, value: evil}]}}]
    backendRefs: [{name: a, port: 80}]
`)
	tbl := Compile([]*gwv1.HTTPRoute{hr}, nil)
	probs := tbl.Problems()
	want := []string{`filter type "ExtensionRef" is not supported`, "longer than timeouts.request", "cross-namespace", "port is required", "only Services", "error parsing regexp", "managed by the proxy"}
	all := ""
	for _, p := range probs {
		all += p.Error() + "\n"
	}
	for _, w := range want {
		if !strings.Contains(all, w) {
			t.Errorf("problems do not mention %q:\n%s", w, all)
		}
	}
	match := func(path string) Result {
		return tbl.Match(reviews, 80, "shop", httptest.NewRequest("GET", path, nil))
	}
	for _, p := range []string{"/rewrite", "/timeout", "/host"} {
		if r := match(p); r.Rule == nil || r.Rule.Refused == nil {
			t.Errorf("%s: rule not refused: %+v", p, r)
		}
	}
	r := match("/backends")
	if r.Rule == nil || r.Rule.Refused != nil {
		t.Fatalf("/backends: %+v", r)
	}
	invalid := 0
	for _, b := range r.Rule.Backends {
		if b.Invalid != nil {
			invalid++
		}
	}
	if invalid != 3 {
		t.Errorf("/backends: %d invalid backends, want 3", invalid)
	}
	if r := match("/zero"); r.Rule == nil || r.Rule.Pick(rand.IntN) != nil {
		t.Errorf("/zero: a backend was picked although all weights are 0")
	}
	// The rule with the broken regular expression is unreachable; other
	// paths fall through to 404 rather than to it.
	if r := match("/other"); !r.Attached || r.Rule != nil {
		t.Errorf("/other: %+v, want 404", r)
	}
}

func TestGRPCRoute(t *testing.T) {
	gr := grpcRoute(t, `
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{method: {service: shop.Reviews, method: Get}}]
    backendRefs: [{name: get, port: 9000}]
  - matches: [{method: {service: shop.Reviews}}]
    backendRefs: [{name: reviews-any, port: 9000}]
  - matches: [{method: {type: RegularExpression, service: "shop\\..*", method: "List.*"}}]
    backendRefs: [{name: list, port: 9000}]
  - matches: [{headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: canary, port: 9000}]
  - backendRefs: [{name: default, port: 9000}]
`)
	hr := httpRoute(t, `
metadata: {name: h, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules: [{backendRefs: [{name: http, port: 80}]}]
`)
	tbl := Compile([]*gwv1.HTTPRoute{hr}, []*gwv1.GRPCRoute{gr})
	if p := tbl.Problems(); len(p) != 0 {
		t.Fatalf("problems: %v", p)
	}
	for _, tc := range []struct {
		path, ct, canary, want string
	}{
		{"/shop.Reviews/Get", "application/grpc", "", "get"},
		{"/shop.Reviews/Put", "application/grpc+proto", "", "reviews-any"},
		{"/shop.Ratings/ListAll", "application/grpc", "", "list"},
		{"/other.Svc/Do", "application/grpc", "1", "canary"},
		{"/other.Svc/Do", "application/grpc", "", "default"},
		{"/shop.Reviews/Get", "application/json", "", "http"}, // not gRPC: HTTPRoutes
	} {
		r := httptest.NewRequest("POST", tc.path, nil)
		r.Header.Set("Content-Type", tc.ct)
		if tc.canary != "" {
			r.Header.Set("X-Canary", tc.canary)
		}
		res := tbl.Match(reviews, 80, "shop", r)
		if res.Rule == nil || res.Rule.Backends[0].Service.Name != tc.want {
			t.Errorf("%s (%s): %+v, want %s", tc.path, tc.ct, res.Rule, tc.want)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"0s": 0, "1s": time.Second, "250ms": 250 * time.Millisecond, "1h30m": 90 * time.Minute, "1h2m3s4ms": time.Hour + 2*time.Minute + 3*time.Second + 4*time.Millisecond,
	} {
		if got, err := ParseDuration(in); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "1", "1.5s", "-1s", "1us", "123456s", "1h1h1h1h1h", "1 s"} {
		if _, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) accepted", in)
		}
	}
}

// FuzzMatch compiles a route from fuzzed match values and matches fuzzed
// requests against it: compiling and matching must never panic, whatever
// got past the API server.
func FuzzMatch(f *testing.F) {
	f.Add("/api", "PathPrefix", "x-a", "b.*", "/api/x?q=1", "GET")
	f.Add("(", "RegularExpression", "bad name", "(", "/", "POST")
	f.Fuzz(func(t *testing.T, path, typ, hname, hval, target, method string) {
		pt := gwv1.PathMatchType(typ)
		ht := gwv1.HeaderMatchRegularExpression
		m := gwv1.HTTPMethod(method)
		hr := &gwv1.HTTPRoute{}
		hr.Namespace, hr.Name = "shop", "fuzz"
		svc := gwv1.Kind("Service")
		grp := gwv1.Group("")
		hr.Spec.ParentRefs = []gwv1.ParentReference{{Kind: &svc, Group: &grp, Name: "reviews"}}
		port := gwv1.PortNumber(80)
		hr.Spec.Rules = []gwv1.HTTPRouteRule{{
			Matches: []gwv1.HTTPRouteMatch{{
				Path:        &gwv1.HTTPPathMatch{Type: &pt, Value: &path},
				Headers:     []gwv1.HTTPHeaderMatch{{Type: &ht, Name: gwv1.HTTPHeaderName(hname), Value: hval}},
				QueryParams: []gwv1.HTTPQueryParamMatch{{Name: gwv1.HTTPHeaderName(hname), Value: hval}},
				Method:      &m,
			}},
			BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "a", Port: &port}}}},
		}}
		tbl := Compile([]*gwv1.HTTPRoute{hr}, nil)
		r, err := http.NewRequest("GET", "http://reviews"+"/"+strings.TrimPrefix(target, "/"), nil)
		if err != nil {
			return
		}
		r.Header.Set("X-A", hval)
		tbl.Match(reviews, 80, "shop", r)
	})
}
