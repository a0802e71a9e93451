package authz

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

func TestNormalizePath(t *testing.T) {
	for _, tc := range []struct {
		target string // request target as sent
		want   string // "" for 400
	}{
		{"/", "/"},
		{"/a/b", "/a/b"},
		{"/a/b/", "/a/b/"},
		{"//a//b", "/a/b"},
		{"/a/./b", "/a/b"},
		{"/a/../b", "/b"},
		{"/../../b", "/b"},
		{"/a/..", "/"},
		{"/a/b/..", "/a"},
		{"/a/b/../", "/a/"},
		{"/%61dmin", "/admin"},
		{"/%2e%2e/admin", "/admin"},
		{"/a%2Fb", ""},
		{"/a%2fb", ""},
		{"/a%5Cb", ""},
		{"/a%5cb", ""},
		{"/a\\b", ""},
		{"/a%00b", ""},
		{"/a%0Ab", ""},
		{"/a%7Fb", ""},
		{"/admin;x=1", "/admin;x=1"},
		{"/a%20b", "/a b"},
		{"/caf%C3%A9", "/café"},
	} {
		u, err := url.ParseRequestURI(tc.target)
		if err != nil {
			t.Fatalf("%q: %v", tc.target, err)
		}
		got, err := NormalizePath(u.Path, u.RawPath)
		if tc.want == "" {
			if err == nil || !errors.Is(err, ErrBadRequest) {
				t.Errorf("NormalizePath(%q) = %q, %v; want ErrBadRequest", tc.target, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("NormalizePath(%q) = %q, %v; want %q", tc.target, got, err, tc.want)
		}
	}
	if _, err := NormalizePath("*", ""); err == nil {
		t.Error("NormalizePath(*) accepted")
	}
}

func TestNormalizeHost(t *testing.T) {
	for _, tc := range []struct{ in, host, hostPort string }{
		{"Example.COM", "example.com", "example.com"},
		{"example.com.", "example.com", "example.com"},
		{"Example.com:8080", "example.com", "example.com:8080"},
		{"example.com.:80", "example.com", "example.com:80"},
		{"[::1]:80", "::1", "[::1]:80"},
		{"[::1]", "::1", "::1"},
		{"10.0.0.1:80", "10.0.0.1", "10.0.0.1:80"},
	} {
		h, hp := NormalizeHost(tc.in)
		if h != tc.host || hp != tc.hostPort {
			t.Errorf("NormalizeHost(%q) = %q, %q; want %q, %q", tc.in, h, hp, tc.host, tc.hostPort)
		}
	}
}

func request(t *testing.T, method, target, host string, hdr map[string][]string) Request {
	t.Helper()
	r := httptest.NewRequest(method, target, nil)
	r.Host = host
	for k, v := range hdr {
		r.Header[http.CanonicalHeaderKey(k)] = v
	}
	req, err := Prepare(r, nil)
	if err != nil {
		t.Fatalf("Prepare(%s %s): %v", method, target, err)
	}
	return req
}

func TestOperation(t *testing.T) {
	op, err := CompileOperation(&v1alpha1.Operation{
		Methods:  []string{"GET", "HEAD"},
		Paths:    []string{"/api/*", "/healthz", "*.png"},
		NotPaths: []string{"/api/admin*"},
		Hosts:    []string{"Reviews.Shop", "*.example.com", "legacy:8080"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		method, target, host string
		want                 bool
	}{
		{"GET", "/api/x", "reviews.shop", true},
		{"HEAD", "/healthz", "REVIEWS.SHOP:80", true},
		{"GET", "/img/a.png", "a.example.com", true},
		{"get", "/api/x", "reviews.shop", false}, // methods are case-sensitive
		{"POST", "/api/x", "reviews.shop", false},
		{"GET", "/api/admin/x", "reviews.shop", false},
		{"GET", "/api//admin", "reviews.shop", false}, // normalised before matching
		{"GET", "/api/../api/admin", "reviews.shop", false},
		{"GET", "/other", "reviews.shop", false},
		{"GET", "/api/x", "evil.shop", false},
		{"GET", "/api/x", "example.com", false}, // *.example.com needs a subdomain
		{"GET", "/api/x", "legacy:8080", true},
		{"GET", "/api/x", "legacy:9090", false}, // a pattern with a port matches that port only
		{"GET", "/api/x", "legacy", false},
		{"GET", "/api/x", "reviews.shop.", true},
	} {
		r := request(t, tc.method, tc.target, tc.host, nil)
		if got := op.Matches(&r); got != tc.want {
			t.Errorf("%s %s (host %s): Matches = %v, want %v", tc.method, tc.target, tc.host, got, tc.want)
		}
	}
	none, err := CompileOperation(&v1alpha1.Operation{Ports: []string{"80"}})
	if none != nil || err != nil {
		t.Errorf("an L4-only operation compiled to %v, %v", none, err)
	}
}

func TestOperationRefused(t *testing.T) {
	for _, op := range []v1alpha1.Operation{
		{Paths: []string{"/api/{*}"}},
		{Paths: []string{"/a//b"}},
		{Paths: []string{"/a/../b"}},
		{Paths: []string{"/a/./b"}},
		{Paths: []string{"/a%2Fb"}},
		{Paths: []string{"/a?x=1"}},
		{Paths: []string{"api"}},
		{Paths: []string{"/a*b"}},
		{NotPaths: []string{""}},
		{Methods: []string{"G ET"}},
		{Hosts: []string{"**"}},
	} {
		if _, err := CompileOperation(&op); err == nil {
			t.Errorf("CompileOperation(%+v) accepted", op)
		}
	}
}

func TestConditions(t *testing.T) {
	conds, err := CompileConditions([]v1alpha1.Condition{
		{Key: "request.headers[x-user]", Values: []string{"alice", "bob*"}},
		{Key: "request.headers[X-Env]", NotValues: []string{"prod"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	all := func(r *Request) bool {
		for i := range conds {
			if !conds[i].Matches(r) {
				return false
			}
		}
		return true
	}
	for _, tc := range []struct {
		hdr  map[string][]string
		want bool
	}{
		{map[string][]string{"x-user": {"alice"}}, true},
		{map[string][]string{"X-USER": {"bobby"}}, true},
		{map[string][]string{"x-user": {"carol"}}, false},
		{map[string][]string{}, false}, // values never match an absent header
		{map[string][]string{"x-user": {"alice"}, "x-env": {"prod"}}, false},
		{map[string][]string{"x-user": {"alice"}, "x-env": {"dev"}}, true},
	} {
		r := request(t, "GET", "/", "h", tc.hdr)
		if got := all(&r); got != tc.want {
			t.Errorf("%v: %v, want %v", tc.hdr, got, tc.want)
		}
	}
	for _, c := range []v1alpha1.Condition{
		{Key: "source.ip", Values: []string{"10.0.0.1"}},
		{Key: "request.headers[x-forwarded-for]", Values: []string{"1.2.3.4"}},
		{Key: "request.headers[Forwarded]", Values: []string{"x"}},
		{Key: "request.headers[baggage]", Values: []string{"x"}},
		{Key: "request.headers[host]", Values: []string{"x"}},
		{Key: "request.headers[bad name]", Values: []string{"x"}},
		{Key: "request.headers[x-a]"},
		{Key: "request.headers[x-a]", Values: []string{""}},
		{Key: "request.auth.claims[iss]", Values: []string{"x"}},
	} {
		if _, err := CompileConditions([]v1alpha1.Condition{c}); err == nil {
			t.Errorf("CompileConditions(%+v) accepted", c)
		}
	}
}

func TestPrepareRepeatedHeader(t *testing.T) {
	r := httptest.NewRequest("GET", "/", nil)
	r.Header["X-User"] = []string{"alice", "mallory"}
	r.Header["Accept"] = []string{"a", "b"}
	if _, err := Prepare(r, []string{"accept-language"}); err != nil {
		t.Errorf("repeated headers no condition names: %v", err)
	}
	if _, err := Prepare(r, []string{"x-user"}); !errors.Is(err, ErrBadRequest) {
		t.Errorf("repeated X-User named by a condition: %v, want ErrBadRequest", err)
	}
}

func TestStringMatch(t *testing.T) {
	for _, tc := range []struct {
		pat, s string
		want   bool
	}{
		{"*", "x", true}, {"*", "", false}, {"a*", "abc", true}, {"a*", "ba", false},
		{"*c", "abc", true}, {"*c", "cb", false}, {"abc", "abc", true}, {"abc", "abcd", false},
	} {
		m, err := CompileStringMatch(tc.pat)
		if err != nil {
			t.Fatal(err)
		}
		if got := m.Matches(tc.s); got != tc.want {
			t.Errorf("%q matches %q = %v, want %v", tc.pat, tc.s, got, tc.want)
		}
		if m.String() != tc.pat {
			t.Errorf("String() = %q, want %q", m.String(), tc.pat)
		}
	}
}
