package policy

import (
	"net/http"
	"testing"

	"github.com/nodemesh/nodemesh/agent/l7/authz"
)

// L7 fields of AuthorizationPolicy at the three stages of a connection:
// not handled at L7 (fail closed), handled at L7 before its requests, and
// per request.
func TestL7Rules(t *testing.T) {
	s := shopSnapshot(t, ap("shop", "be-read", `
selector: {matchLabels: {app: be}}
rules:
- from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
  to: [{operation: {methods: [GET, HEAD], paths: ["/api/*"], notPaths: ["/api/private*"]}}]
- to: [{operation: {ports: ["8080"], paths: [/healthz]}}]
- to: [{operation: {ports: ["9000"]}}]
`)+ap("shop", "be-deny", `
selector: {matchLabels: {app: be}}
action: DENY
rules:
- to: [{operation: {hosts: [admin.shop.example]}}]
- when: [{key: "request.headers[x-debug]", values: ["1"]}]
`))
	fe := Flow{Src: ipFE, Dst: ipBE, Port: 8080, Principal: idFE, Protocol: "TCP"}
	ot := Flow{Src: ipOT, Dst: ipBE, Port: 8080, Principal: idOT, Protocol: "TCP"}

	// Not handled at L7: the DENY policy's rules have only L7 fields, so
	// they match every connection (fail closed) and deny it, even to 9000.
	if d := s.DecideIngress(fe); d.Allowed() || d.Policy.Name != "be-deny" {
		t.Fatalf("L4 connection with L7 DENY rules: %s", d.Text())
	}
	nine := fe
	nine.Port = 9000
	if d := s.DecideIngress(nine); d.Allowed() {
		t.Fatalf("L4 connection to 9000: %s", d.Text())
	}

	// Handled at L7, before the requests: DENY rules wait for the
	// requests; ALLOW rules match on their L4 fields.
	l7fe, l7ot := fe, ot
	l7fe.L7, l7ot.L7 = true, true
	if d := s.DecideIngress(l7fe); !d.Allowed() || d.Policy.Name != "be-read" || d.Rule != 0 {
		t.Fatalf("L7 connection from fe: %s", d.Text())
	}
	if d := s.DecideIngress(l7ot); !d.Allowed() || d.Rule != 1 {
		// rule 1 (/healthz on 8080) can still match a request from ot
		t.Fatalf("L7 connection from ot: %s", d.Text())
	}
	l7other := l7ot
	l7other.Port = 8443
	if d := s.DecideIngress(l7other); d.Allowed() {
		t.Fatalf("L7 connection to a port no ALLOW rule names: %s", d.Text())
	}

	req := func(method, path, host string, hdr ...string) *authz.Request {
		h := http.Header{}
		for i := 0; i+1 < len(hdr); i += 2 {
			h.Add(hdr[i], hdr[i+1])
		}
		hn, hp := authz.NormalizeHost(host)
		return &authz.Request{Method: method, Path: path, Host: hn, HostPort: hp, Header: h}
	}
	for _, tc := range []struct {
		name  string
		f     Flow
		r     *authz.Request
		allow bool
		rule  int
	}{
		{"fe GET /api/items", fe, req("GET", "/api/items", "be.shop"), true, 0},
		{"fe HEAD /api/", fe, req("HEAD", "/api/", "be.shop:8080"), true, 0},
		{"fe POST /api/items", fe, req("POST", "/api/items", "be.shop"), false, -1},
		{"fe GET /api/private/x (notPaths)", fe, req("GET", "/api/private/x", "be.shop"), false, -1},
		{"fe GET /apix (not under /api/)", fe, req("GET", "/apix", "be.shop"), false, -1},
		{"ot GET /api/items (not frontend)", ot, req("GET", "/api/items", "be.shop"), false, -1},
		{"ot GET /healthz", ot, req("GET", "/healthz", "be.shop"), true, 1},
		{"fe GET /api/items on the admin host", fe, req("GET", "/api/items", "ADMIN.shop.example.:80"), false, 0},
		{"fe GET /api/items with x-debug: 1", fe, req("GET", "/api/items", "be.shop", "X-Debug", "1"), false, 1},
		{"fe GET /api/items with x-debug: 0", fe, req("GET", "/api/items", "be.shop", "X-Debug", "0"), true, 0},
	} {
		d := s.DecideRequest(tc.f, tc.r)
		if d.Allowed() != tc.allow || d.Rule != tc.rule {
			t.Errorf("%s: %s rule %d, want allow=%v rule %d\n%s", tc.name, d.Verdict, d.Rule, tc.allow, tc.rule, d.Text())
		}
	}
	if hs := s.RequestHeaders(); len(hs) != 1 || hs[0] != "X-Debug" {
		t.Errorf("RequestHeaders = %v, want [X-Debug]", hs)
	}
}
