package route

import (
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// The Gateway API's ReplacePrefixMatch table (HTTPPathModifier), and
// ReplaceFullPath.
func TestPathModifier(t *testing.T) {
	for _, tc := range []struct {
		path, prefix, replace, want string
	}{
		{"/foo/bar", "/foo", "/xyz", "/xyz/bar"},
		{"/foo/bar", "/foo", "/xyz/", "/xyz/bar"},
		{"/foo/bar", "/foo/", "/xyz", "/xyz/bar"},
		{"/foo/bar", "/foo/", "/xyz/", "/xyz/bar"},
		{"/foo", "/foo", "/xyz", "/xyz"},
		{"/foo/", "/foo", "/xyz", "/xyz/"},
		{"/foo/bar", "/foo", "", "/bar"},
		{"/foo/", "/foo", "", "/"},
		{"/foo", "/foo", "", "/"},
		{"/foo/", "/foo", "/", "/"},
		{"/foo", "/foo", "/", "/"},
		{"/anything/else", "/", "/v2", "/v2/anything/else"},
		{"/", "/", "/v2", "/v2/"},
	} {
		// A trailing slash of the match's prefix is dropped when it is
		// compiled (rulePrefix), as PathPrefix matching does.
		prefix, _ := rulePrefix([]gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: ptr(gwv1.PathMatchPathPrefix), Value: &tc.prefix}}})
		m := &PathModifier{Prefix: prefix, Replace: tc.replace}
		if got := m.Apply(tc.path); got != tc.want {
			t.Errorf("%s with prefix %s replaced by %q: %s, want %s", tc.path, tc.prefix, tc.replace, got, tc.want)
		}
	}
	full := &PathModifier{Full: "/one", FullSet: true}
	if got := full.Apply("/full/one/two"); got != "/one" {
		t.Errorf("ReplaceFullPath: %s", got)
	}
}

func ptr[T any](v T) *T { return &v }

const filtersRoute = `
metadata: {name: filters, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /prefix}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: Elsewhere.Example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}
    backendRefs:
    - name: a
      port: 80
      filters:
      - {type: URLRewrite, urlRewrite: {hostname: backend.example}}
  - matches: [{path: {type: PathPrefix, value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
  - matches: [{path: {type: PathPrefix, value: /scheme}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /scheme-port}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, port: 8443, hostname: example.org}}]
  - matches: [{path: {type: PathPrefix, value: /http80}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: http}}]
  - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
  - matches: [{path: {type: PathPrefix, value: /full-redirect}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}}}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow-half, port: 80}, percent: 50}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow-tenth, port: 80}, fraction: {numerator: 1, denominator: 10}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow-none, port: 80}, percent: 0}}
    backendRefs: [{name: a, port: 80}]
`

func TestFilters(t *testing.T) {
	tbl := Compile([]*gwv1.HTTPRoute{httpRoute(t, filtersRoute)}, nil)
	if p := tbl.Problems(); len(p) != 0 {
		t.Fatalf("problems: %v", p)
	}
	match := func(target, host string) *Rule {
		t.Helper()
		r := httptest.NewRequest("GET", target, nil)
		r.Host = host
		res := tbl.Match(reviews, 80, "shop", r)
		if res.Rule == nil {
			t.Fatalf("%s: no rule", target)
		}
		return res.Rule
	}

	// URLRewrite: the Host and the path the backend sees; the query stays.
	for _, tc := range []struct {
		target, wantHost, wantURI string
	}{
		{"/prefix/a/b?x=1", "elsewhere.example", "/new/a/b?x=1"},
		{"/prefix", "elsewhere.example", "/new"},
		{"/prefix/", "elsewhere.example", "/new/"},
		{"/full/one/two", "reviews", "/one"},
	} {
		rule := match(tc.target, "reviews")
		r := httptest.NewRequest("GET", tc.target, nil)
		r.Host = "reviews"
		rule.Rewrite.Apply(r)
		if r.Host != tc.wantHost || r.URL.RequestURI() != tc.wantURI {
			t.Errorf("rewrite of %s: host %s, URI %s; want %s %s", tc.target, r.Host, r.URL.RequestURI(), tc.wantHost, tc.wantURI)
		}
		if tc.target == "/full/one/two" {
			if rw := rule.Backends[0].Rewrite; rw == nil || rw.Hostname != "backend.example" {
				t.Errorf("the backendRef's URLRewrite: %+v", rw)
			}
		}
	}

	// RequestRedirect, on the Service port 80 (the mesh's listener).
	for _, tc := range []struct {
		target, host string
		status       int
		location     string
	}{
		{"/port", "reviews", 302, "http://reviews:8083/port"},
		{"/port", "reviews:80", 302, "http://reviews:8083/port"},
		{"/port/x?q=1", "reviews", 302, "http://reviews:8083/port/x?q=1"},
		{"/scheme", "reviews", 301, "https://reviews/scheme"},
		{"/scheme-port", "reviews", 302, "https://example.org:8443/scheme-port"},
		{"/http80", "reviews:9090", 302, "http://reviews/http80"},
		{"/original-prefix/lemon", "reviews", 302, "http://reviews/replacement-prefix/lemon"},
		{"/full-redirect/x", "reviews", 302, "http://example.org/replacement-full"},
		{"/port", "", 302, "http://reviews.shop.svc:8083/port"},
		{"/port", "[fd00::1]:80", 302, "http://[fd00::1]:8083/port"},
	} {
		rule := match(tc.target, tc.host)
		if rule.Redirect == nil {
			t.Fatalf("%s: no redirect", tc.target)
		}
		r := httptest.NewRequest("GET", tc.target, nil)
		r.Host = tc.host
		if got := rule.Redirect.Location(r, 80, "reviews.shop.svc"); got != tc.location || rule.Redirect.Status != tc.status {
			t.Errorf("redirect of %s (Host %q): %d %s, want %d %s", tc.target, tc.host, rule.Redirect.Status, got, tc.status, tc.location)
		}
	}
	// With no scheme and no port, the listener port is kept.
	rule := match("/original-prefix", "reviews")
	if got := rule.Redirect.Location(httptest.NewRequest("GET", "/original-prefix", nil), 8080, ""); got != "http://example.com:8080/replacement-prefix" {
		t.Errorf("redirect on listener port 8080: %s", got)
	}

	// RequestMirror: backends, and the share of requests each one copies.
	rule = match("/mirror", "reviews")
	if len(rule.Mirrors) != 4 {
		t.Fatalf("%d mirrors, want 4", len(rule.Mirrors))
	}
	if b := rule.Mirrors[0].Backend; b.Service != (ServiceKey{"shop", "shadow"}) || b.Port != 8080 {
		t.Errorf("mirror backend %+v", b)
	}
	for i, want := range []int{1000, 500, 100, 0} {
		n := 0
		seq := 0
		for range 1000 {
			// A deterministic uniform sequence: exactly the share.
			if rule.Mirrors[i].Sample(func(k int) int { seq++; return seq % k }) {
				n++
			}
		}
		if n != want {
			t.Errorf("mirror %d copied %d of 1000 requests, want %d", i, n, want)
		}
	}
}

// Filters the agent cannot honour as written refuse their rule (500 for
// matching requests) and are reported; an unusable mirror backend drops the
// mirror only.
func TestFiltersRefused(t *testing.T) {
	hr := httpRoute(t, `
metadata: {name: bad-filters, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /both}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: a.example}}
    - {type: RequestRedirect, requestRedirect: {hostname: b.example}}
  - matches: [{path: {type: PathPrefix, value: /redirect-backends}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 81}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: Exact, value: /exact}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /two}}, {path: {type: PathPrefix, value: /three}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]
  - matches: [{path: {type: PathPrefix, value: /status}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]
  - matches: [{path: {type: PathPrefix, value: /scheme}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]
  - matches: [{path: {type: PathPrefix, value: /dots}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /a/../admin}}}]
  - matches: [{path: {type: PathPrefix, value: /escape}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /a%2Fb}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /relative}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: relative}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /host}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: "bad host:80"}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /percent}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, percent: 101}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /fraction}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, fraction: {numerator: 3, denominator: 2}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /backend-redirect}}]
    backendRefs:
    - name: a
      port: 80
      filters: [{type: RequestRedirect, requestRedirect: {port: 81}}]
  - matches: [{path: {type: PathPrefix, value: /mirror-elsewhere}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: s, namespace: other, port: 80}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: noport}}}
    backendRefs: [{name: a, port: 80}]
`)
	tbl := Compile([]*gwv1.HTTPRoute{hr}, nil)
	all := ""
	for _, p := range tbl.Problems() {
		all += p.Error() + "\n"
	}
	for _, w := range []string{
		"URLRewrite and RequestRedirect cannot be used together",
		"cannot be used together with backendRefs",
		"exactly one match, of type PathPrefix",
		"statusCode 307: want 301 or 302",
		`scheme "ftp"`,
		"must not contain . or .. segments",
		`must not contain //, ?, #, % or \`,
		"must start with /",
		"is not a DNS name",
		"percent 101",
		"fraction 3/2",
		"RequestRedirect is not supported on a backendRef",
		"cross-namespace backendRefs are not supported yet; the mirror is dropped",
		"port is required for a Service backend; the mirror is dropped",
	} {
		if !strings.Contains(all, w) {
			t.Errorf("problems do not mention %q:\n%s", w, all)
		}
	}
	match := func(path string) Result {
		return tbl.Match(reviews, 80, "shop", httptest.NewRequest("GET", path, nil))
	}
	for _, p := range []string{"/both", "/redirect-backends", "/exact", "/two", "/status", "/scheme", "/dots", "/escape", "/relative", "/host", "/percent", "/fraction"} {
		if r := match(p); r.Rule == nil || r.Rule.Refused == nil {
			t.Errorf("%s: rule not refused: %+v", p, r)
		}
	}
	if r := match("/backend-redirect"); r.Rule == nil || r.Rule.Refused != nil || r.Rule.Backends[0].Invalid == nil {
		t.Errorf("/backend-redirect: want the backend invalid, the rule kept: %+v", r.Rule)
	}
	r := match("/mirror-elsewhere")
	if r.Rule == nil || r.Rule.Refused != nil || len(r.Rule.Mirrors) != 0 {
		t.Errorf("/mirror-elsewhere: want the rule routed without its unusable mirrors: %+v", r.Rule)
	}
}

// FuzzRedirectLocation: whatever path and Host a client sends (net/http
// admits them first), the Location the agent writes is one valid header
// value and a URL with the filter's host, and a rewritten path keeps the
// replacement's prefix.
func FuzzRedirectLocation(f *testing.F) {
	f.Add("/prefix/a/b", "reviews:80", "q=1")
	f.Add("/prefix", "[fd00::1]:8080", "")
	f.Add("/prefix/%2e%2e/x", "a.example", "x=%0d%0a")
	f.Fuzz(func(t *testing.T, path, host, query string) {
		if !strings.HasPrefix(path, "/prefix") || (len(path) > len("/prefix") && path[len("/prefix")] != '/') {
			return // the rule's PathPrefix would not match
		}
		r := httptest.NewRequest("GET", "/", nil)
		r.URL.Path, r.URL.RawQuery, r.Host = path, query, host
		if !httpguts.ValidHostHeader(host) || !httpguts.ValidHeaderFieldValue(query) || strings.ContainsAny(query, " \t") {
			return // net/http refuses such a Host; a request line has no blanks in its query
		}
		rd := &Redirect{Hostname: "target.example", Status: 302, Path: &PathModifier{Prefix: "/prefix", Replace: "/new"}}
		loc := rd.Location(r, 8080, "svc.ns.svc")
		if !httpguts.ValidHeaderFieldValue(loc) {
			t.Fatalf("Location %q is not a valid header value", loc)
		}
		u, err := url.Parse(loc)
		if err != nil || u.Hostname() != "target.example" || !strings.HasPrefix(u.Path, "/new") {
			t.Fatalf("Location %q: %v %+v", loc, err, u)
		}
		rw := &URLRewrite{Path: rd.Path}
		rw.Apply(r)
		if !strings.HasPrefix(r.URL.Path, "/new") || !strings.HasPrefix(r.URL.RequestURI(), "/new") {
			t.Fatalf("rewrite of %q: %q", path, r.URL.RequestURI())
		}
	})
}
