package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// dumpApp answers each request with what it received (request line, Host,
// header, body), framed as the path asks: /chunked (with a trailer and
// hop-by-hop headers), /nolength (close-delimited), /close, /204, /early
// (a 103 first), /big (a Content-Length body of about 100 kB: the dump
// repeated), else a Content-Length with hop-by-hop headers.
func dumpApp(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		body, _ := io.ReadAll(req.Body)
		var b strings.Builder
		fmt.Fprintf(&b, "%s %s %s host=%s body=%q\n", req.Method, req.RequestURI, req.Proto, req.Host, body)
		keys := slices.Sorted(func(yield func(string) bool) {
			for k := range req.Header {
				if !yield(k) {
					return
				}
			}
		})
		for _, k := range keys {
			fmt.Fprintf(&b, "%s: %q\n", k, req.Header[k])
		}
		dump := b.String()
		var out string
		switch req.URL.Path {
		case "/chunked":
			out = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n" +
				fmt.Sprintf("%x\r\n%s\r\n0\r\nX-Sum: 9\r\n\r\n", len(dump), dump)
		case "/nolength":
			io.WriteString(c, "HTTP/1.1 200 OK\r\nX-App: 1\r\n\r\n"+dump)
			return
		case "/close":
			io.WriteString(c, fmt.Sprintf("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(dump), dump))
			return
		case "/big":
			// Far more than one read's worth at each agent.
			big := strings.Repeat(dump, 1+100000/len(dump))
			out = fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(big), big)
		case "/204":
			out = "HTTP/1.1 204 No Content\r\nX-App: 1\r\n\r\n"
		case "/early":
			out = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" +
				fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(dump), dump)
		default:
			out = fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-App: 1\r\nProxy-Authenticate: x\r\nUpgrade: nope\r\n\r\n%s", len(dump), dump)
		}
		if _, err := io.WriteString(c, out); err != nil {
			return
		}
	}
}

// l7Exchange sends raw requests on one client connection to the opted-in
// Service and returns each response as comparable text: status, header
// (without Date, the Content-Type net/http's server sniffs, and framing),
// body and trailers.
func l7Exchange(t *testing.T, f *fixture, requests []string) []string {
	t.Helper()
	c := f.dial(svcL7VIP)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	br := bufio.NewReader(c)
	var out []string
	for _, r := range requests {
		if _, err := io.WriteString(c, r); err != nil {
			out = append(out, "write: "+err.Error())
			break
		}
		method, _, _ := strings.Cut(r, " ")
		for {
			resp, err := http.ReadResponse(br, &http.Request{Method: method})
			if err != nil {
				out = append(out, "read: "+err.Error())
				return out
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, k := range []string{"Date", "Content-Type", "Content-Length", "X-Content-Type-Options"} {
				delete(resp.Header, k)
			}
			out = append(out, fmt.Sprintf("%d %v close=%v trailer=%v err=%v\n%s", resp.StatusCode, resp.Header, resp.Close, resp.Trailer, err, body))
			if resp.StatusCode >= 200 {
				break
			}
		}
	}
	return out
}

// The lean path forwards as net/http's ReverseProxy does: the same
// request reaches the application and the same response the client,
// through both agents; what it does not serve itself falls back.
func TestL7LeanLikeReverseProxy(t *testing.T) {
	get := func(path string, hdr ...string) string {
		return "GET " + path + " HTTP/1.1\r\nHost: b.default.svc.cluster.local\r\n" + strings.Join(hdr, "") + "\r\n"
	}
	cases := []struct {
		name     string
		requests []string
	}{
		{"keep-alive", []string{get("/a?x=1"), get("/b", "User-Agent: ua\r\n"), get("/c")}},
		{"hop-by-hop and forwarding headers", []string{get("/h", "Connection: X-Foo, keep-alive\r\n", "X-Foo: 1\r\n", "Keep-Alive: 5\r\n",
			"Te: trailers, deflate\r\n", "Proxy-Authorization: secret\r\n", "Forwarded: for=1.2.3.4\r\n",
			"X-Forwarded-For: 1.2.3.4\r\n", "X-Forwarded-Proto: https\r\n", "Baggage: k=v\r\n")}},
		{"query cleaned", []string{get("/q?a=1;b=2&c=%zz&d=4")}},
		{"paths", []string{get("/x/../y//z"), get("/%2e%2e/a"), get("/a%2Fb"), get("/a;p=1")}},
		{"chunked response with trailer", []string{get("/chunked"), get("/after")}},
		{"no length", []string{get("/nolength")}},
		{"upstream closes", []string{get("/close"), get("/after")}},
		{"no content", []string{get("/204"), get("/after")}},
		{"large body", []string{get("/big"), get("/after")}},
		{"early hints", []string{get("/early")}},
		{"denied keeps the connection", []string{"POST /p HTTP/1.1\r\nHost: b.default.svc.cluster.local\r\nContent-Length: 0\r\n\r\n", get("/after")}},
		{"client closes", []string{get("/a", "Connection: close\r\n")}},
		{"small body", []string{get("/a"), "GET /g HTTP/1.1\r\nHost: b.default.svc.cluster.local\r\nContent-Length: 3\r\n\r\nabc", get("/after")}},
		{"HEAD falls back", []string{"HEAD /a HTTP/1.1\r\nHost: b.default.svc.cluster.local\r\n\r\n", get("/after")}},
	}
	fixtures := map[bool]*fixture{}
	for _, netHTTPOnly := range []bool{true, false} {
		f, _ := newL7Fixture(t, l7Opts{netHTTPOnly: netHTTPOnly, app: dumpApp})
		fixtures[netHTTPOnly] = f
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			want := l7Exchange(t, fixtures[true], tc.requests)
			got := l7Exchange(t, fixtures[false], tc.requests)
			if len(want) < len(tc.requests) {
				t.Errorf("net/http path: %d answers to %d requests: %q", len(want), len(tc.requests), want)
			}
			if !slices.Equal(got, want) {
				t.Errorf("the lean path differs from net/http's:\nlean:     %q\nnet/http: %q", got, want)
			}
		})
	}
}
