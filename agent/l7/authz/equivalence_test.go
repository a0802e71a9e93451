package authz

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// app is a Go net/http backend whose routing decides what is "admin": the
// handlers a ServeMux picks for /admin and /admin/. It records what each
// request looked like when it arrived.
type app struct {
	srv  *httptest.Server
	mu   sync.Mutex
	seen []seenReq
}

type seenReq struct {
	class string // handler: "admin" or "public"
	path  string // r.URL.Path
	user  string // r.Header.Get("X-User")
}

func newApp(t *testing.T) *app {
	a := &app{}
	mux := http.NewServeMux()
	h := func(class string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			a.mu.Lock()
			a.seen = append(a.seen, seenReq{class: class, path: r.URL.Path, user: r.Header.Get("X-User")})
			a.mu.Unlock()
			fmt.Fprintf(w, "%s %s\n", class, r.URL.Path)
		}
	}
	mux.HandleFunc("/admin", h("admin"))
	mux.HandleFunc("/admin/", h("admin"))
	mux.HandleFunc("/", h("public"))
	a.srv = httptest.NewServer(mux)
	t.Cleanup(a.srv.Close)
	return a
}

func (a *app) take() []seenReq {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.seen
	a.seen = nil
	return s
}

// roundTrip writes a raw HTTP/1.1 request (target and header lines exactly
// as given) on conn and reads the response.
func roundTrip(t *testing.T, conn net.Conn, br *bufio.Reader, method, target string, header []string) *http.Response {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: reviews.shop\r\n", method, target)
	for _, h := range header {
		b.WriteString(h + "\r\n")
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatalf("writing %s %s: %v", method, target, err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response to %s %s: %v", method, target, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

func dial(t *testing.T, srv *httptest.Server) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

// direct asks the app itself how it treats a raw request, following one
// redirect (ServeMux redirects unclean paths to their clean form, and a
// client follows it): it returns what the app's handler saw, or nil when
// no handler ran.
func (a *app) direct(t *testing.T, method, target string, header []string) *seenReq {
	c, br := dial(t, a.srv)
	resp := roundTrip(t, c, br, method, target, header)
	if resp.StatusCode == http.StatusMovedPermanently {
		loc, err := url.Parse(resp.Header.Get("Location"))
		if err == nil {
			roundTrip(t, c, br, method, loc.RequestURI(), header)
		}
	}
	s := a.take()
	if len(s) == 0 {
		return nil
	}
	return &s[len(s)-1]
}

// TestEquivalence sends tricky requests through the L7 authorization
// handler (in front of a reverse proxy to a real net/http backend) and to
// the backend directly, and checks that both decide the same way: a request
// the backend would serve as "admin" (or as user mallory) is never let
// through, and whatever is let through reaches the backend as exactly the
// path that was authorised.
func TestEquivalence(t *testing.T) {
	a := newApp(t)
	backend, _ := url.Parse(a.srv.URL)
	proxy := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(backend)
		pr.Out.Host = pr.In.Host
	}}
	deny, err := CompileOperation(&v1alpha1.Operation{Paths: []string{"/admin", "/admin/*"}})
	if err != nil {
		t.Fatal(err)
	}
	conds, err := CompileConditions([]v1alpha1.Condition{{Key: "request.headers[x-user]", Values: []string{"mallory"}}})
	if err != nil {
		t.Fatal(err)
	}
	var lastAuthorised string
	decide := func(r *Request) (bool, string) {
		lastAuthorised = r.Path
		if deny.Matches(r) {
			return false, "admin path"
		}
		if conds[0].Matches(r) {
			return false, "mallory"
		}
		return true, ""
	}
	front := httptest.NewServer(Handler(decide, []string{"x-user"}, proxy))
	defer front.Close()

	for _, tc := range []struct {
		method, target string
		header         []string
		want           int // status at the front: 200, 403 or 400
	}{
		{"GET", "/public", nil, 200},
		{"GET", "/admin", nil, 403},
		{"GET", "/admin/", nil, 403},
		{"GET", "/admin/users", nil, 403},
		{"GET", "//admin", nil, 403},
		{"GET", "///admin//x", nil, 403},
		{"GET", "/public/../admin", nil, 403},
		{"GET", "/./admin", nil, 403},
		{"GET", "/%2e%2e/admin", nil, 403},
		{"GET", "/public/%2e%2e/admin", nil, 403},
		{"GET", "/%61dmin", nil, 403},
		{"GET", "/%41DMIN", nil, 200}, // /ADMIN: paths are case-sensitive, for both
		{"GET", "/admin?x=1", nil, 403},
		{"GET", "/public?/admin", nil, 200},
		{"GET", "/admin/%2e%2e/public", nil, 200}, // resolves to /public for both
		{"GET", "/public/..%2Fadmin", nil, 400},
		{"GET", "/admin%2Fx", nil, 400},
		{"GET", "/admin%2fx", nil, 400},
		{"GET", "/admin%5Cx", nil, 400},
		{"GET", "/public\\..\\admin", nil, 400},
		{"GET", "/admin%00", nil, 400},
		{"GET", "/admin;x=1", nil, 200}, // one segment "admin;x=1" for both
		{"GET", "/admin#frag", nil, 200},
		{"GET", "/ADMIN", nil, 200},
		{"GET", "http://reviews.shop/admin", nil, 403},
		{"GET", "/public", []string{"X-User: mallory"}, 403},
		{"GET", "/public", []string{"x-user: mallory"}, 403},
		{"GET", "/public", []string{"X-User: MALLORY"}, 200}, // values are case-sensitive, for both
		{"GET", "/public", []string{"X-User: alice", "X-User: mallory"}, 400},
		{"GET", "/public", []string{"X-User: mallory", "X-User: alice"}, 400},
		{"GET", "/public", []string{"X_User: mallory"}, 200}, // not the X-User header, for both
	} {
		name := tc.method + " " + tc.target + " " + strings.Join(tc.header, ",")
		c, br := dial(t, front)
		lastAuthorised = ""
		resp := roundTrip(t, c, br, tc.method, tc.target, tc.header)
		got := a.take()
		if resp.StatusCode != tc.want {
			t.Errorf("%s: front answered %d, want %d", name, resp.StatusCode, tc.want)
		}
		passed := resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusBadRequest
		if passed {
			if len(got) != 1 {
				t.Errorf("%s: passed, but the backend saw %d requests", name, len(got))
				continue
			}
			if got[0].class == "admin" || got[0].user == "mallory" {
				t.Errorf("%s: the backend served %+v after authorization allowed it", name, got[0])
			}
			if got[0].path != lastAuthorised {
				t.Errorf("%s: authorised path %q, but the backend saw %q", name, lastAuthorised, got[0].path)
			}
		} else if len(got) != 0 {
			t.Errorf("%s: refused with %d, but the backend saw %+v", name, resp.StatusCode, got)
		}
		if resp.StatusCode == http.StatusBadRequest {
			continue
		}
		// The app, given the request as authorised (the one the agent
		// forwards), decides as authorization did.
		fwd := (&url.URL{Path: lastAuthorised}).EscapedPath()
		appSaw := a.direct(t, tc.method, fwd, tc.header)
		appDenies := appSaw != nil && (appSaw.class == "admin" || appSaw.user == "mallory")
		if appDenies == passed {
			t.Errorf("%s: authorization passed=%v, but the app given %q serves %+v", name, passed, fwd, appSaw)
		}
	}

	// Why the agent forwards the normalised path rather than the client's
	// bytes: Go's ServeMux routes an encoded dot segment literally, so the
	// original request would reach the admin handler although it was
	// authorised as /public.
	if saw := a.direct(t, "GET", "/admin/%2e%2e/public", nil); saw == nil || saw.class != "admin" {
		t.Logf("note: the app no longer routes /admin/%%2e%%2e/public to admin (%+v); the rewrite is still what keeps both views equal", saw)
	}
}

// TestDeniedConnectionSurvives checks that a 403 leaves the connection
// usable: the next request on it is served.
func TestDeniedConnectionSurvives(t *testing.T) {
	a := newApp(t)
	backend, _ := url.Parse(a.srv.URL)
	proxy := httputil.NewSingleHostReverseProxy(backend)
	deny, _ := CompileOperation(&v1alpha1.Operation{Paths: []string{"/admin*"}})
	front := httptest.NewServer(Handler(func(r *Request) (bool, string) { return !deny.Matches(r), "" }, nil, proxy))
	defer front.Close()
	c, br := dial(t, front)
	for i, tc := range []struct {
		target string
		want   int
	}{{"/admin", 403}, {"/public", 200}, {"/admin/x", 403}, {"/a%2Fb", 400}, {"/public", 200}} {
		if resp := roundTrip(t, c, br, "GET", tc.target, nil); resp.StatusCode != tc.want || resp.Close {
			t.Fatalf("request %d on one connection (%s): status %d close=%v, want %d and the connection kept", i, tc.target, resp.StatusCode, resp.Close, tc.want)
		}
	}
}
