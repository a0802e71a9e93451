package authz

import (
	"bufio"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// FuzzPrepare parses fuzzed request lines and headers with net/http, as
// the agent does, and checks what Prepare promises: it never panics; an
// accepted path is normalised (starts with /, no //, . or .. segments, no
// backslash or control character) and stable under a second Prepare; and
// the request line forwarded to the application parses back to exactly the
// path that was authorised.
func FuzzPrepare(f *testing.F) {
	for _, s := range []string{"/a/../b", "//admin", "/%2e%2e/x", "/a%2Fb", "/a;b=c/d", "/caf%C3%A9?x=1", "/a b", "*", "http://h/x"} {
		f.Add(s, "Example.COM:80", "x")
	}
	f.Fuzz(func(t *testing.T, target, host, user string) {
		raw := "GET " + target + " HTTP/1.1\r\nHost: " + host + "\r\nX-User: " + user + "\r\n\r\n"
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return // net/http refuses it before the agent sees it
		}
		req, err := Prepare(r, []string{"x-user"})
		if err != nil {
			return
		}
		p := req.Path
		if !strings.HasPrefix(p, "/") || strings.Contains(p, "//") || strings.Contains(p+"/", "/./") || strings.Contains(p+"/", "/../") || strings.ContainsAny(p, "\\\x00") {
			t.Fatalf("target %q: Prepare accepted the unnormalised path %q", target, p)
		}
		if again, err := NormalizePath(p, ""); err != nil || again != p {
			t.Fatalf("target %q: normalising %q again gives %q, %v", target, p, again, err)
		}
		// What the proxy writes on the request line to the application.
		fwd := r.URL.EscapedPath()
		u, err := url.ParseRequestURI(fwd)
		if err != nil {
			t.Fatalf("target %q: the forwarded path %q does not parse: %v", target, fwd, err)
		}
		if u.Path != p {
			t.Fatalf("target %q: authorised %q, but the application would see %q (forwarded %q)", target, p, u.Path, fwd)
		}
		if req.Host != strings.ToLower(req.Host) {
			t.Fatalf("host %q not lowercased", req.Host)
		}
	})
}
