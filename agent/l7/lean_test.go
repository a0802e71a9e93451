package l7

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"
)

// serveFunc is ServeConn or ServeHTTP1 for HTTP/1.x.
type serveFunc func(ctx context.Context, c net.Conn, h http.Handler)

var servers = []struct {
	name  string
	serve serveFunc
}{
	{"net/http", func(ctx context.Context, c net.Conn, h http.Handler) { ServeConn(ctx, c, HTTP1, h, 0) }},
	{"lean", func(ctx context.Context, c net.Conn, h http.Handler) { ServeHTTP1(ctx, c, h, 0) }},
}

// leanCount counts the requests a handler got through a *LeanWriter.
type leanCount struct {
	h    http.Handler
	lean atomic.Int64
	all  atomic.Int64
}

func (l *leanCount) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	l.all.Add(1)
	if _, ok := w.(*LeanWriter); ok {
		l.lean.Add(1)
	}
	l.h.ServeHTTP(w, r)
}

// echoRequest answers with what it was given, as a backend would see it.
func echoRequest(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/deny" {
		http.Error(w, "denied", http.StatusForbidden)
		return
	}
	body, _ := io.ReadAll(r.Body)
	fmt.Fprintf(w, "%s %s %s host=%s body=%q", r.Proto, r.Method, r.URL.RequestURI(), r.Host, body)
}

// exchange sends input on a loopback TCP connection served by serve with
// h, half-closes, and returns everything the server wrote until it closed.
func exchange(t testing.TB, serve serveFunc, h http.Handler, input string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		serve(context.Background(), c, h)
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	out := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(c)
		out <- b
	}()
	if _, err := io.WriteString(c, input); err != nil {
		// The server may close before reading everything (a header too
		// large); what it answered is still read.
		t.Logf("writing the input: %v", err)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	got := <-out
	<-done
	return string(got)
}

var volatileHeader = regexp.MustCompile(`(?m)^(Date|Content-Type|X-Content-Type-Options): [^\r\n]*\r\n`)

// responses parses what a server wrote into comparable lines: status,
// Connection header and body of each response, in order (Date and the
// Content-Type net/http's server sniffs for handlers' bodies are left out).
func responses(raw string) []string {
	raw = volatileHeader.ReplaceAllString(raw, "")
	br := bufio.NewReader(strings.NewReader(raw))
	var out []string
	for {
		if _, err := br.Peek(1); err != nil {
			return out
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return append(out, "unparsable: "+err.Error())
		}
		body, err := io.ReadAll(resp.Body)
		line := fmt.Sprintf("%d close=%v %q", resp.StatusCode, resp.Close, body)
		if err != nil {
			line += " body error"
		}
		out = append(out, line)
		if err != nil {
			return out
		}
	}
}

// The lean path answers as net/http's server does, request after request,
// whether it serves the request itself or replays it to the server; and
// it serves what it should itself.
func TestServeHTTP1LikeServeConn(t *testing.T) {
	get := "GET /a?x=1 HTTP/1.1\r\nHost: web\r\n\r\n"
	cases := []struct {
		name  string
		input string
		lean  int // requests served on the lean path
		want  int // responses
	}{
		{"one GET", get, 1, 1},
		{"keep-alive", get + get + "GET /b HTTP/1.1\r\nHost: web\r\nUser-Agent: x\r\n\r\n", 3, 3},
		{"deny then serve", "GET /deny HTTP/1.1\r\nHost: web\r\n\r\n" + get, 2, 2},
		{"a long answer, then a short one", "GET /" + strings.Repeat("l", 300) + " HTTP/1.1\r\nHost: web\r\n\r\n" + get, 2, 2},
		{"connection close", "GET /a HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n" + get, 1, 1},
		{"bodiless POST", "POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n\r\n" + get, 2, 2},
		{"POST with a body", get + "POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello" + get, 3, 3},
		{"body the handler leaves", "POST /deny HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello" + get, 2, 2},
		{"body over 64 KiB falls back", "POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 65537\r\n\r\n" + strings.Repeat("b", 65537) + get, 0, 2},
		{"chunked body falls back", "POST /p HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + get, 0, 2},
		{"HEAD falls back", "HEAD /a HTTP/1.1\r\nHost: web\r\n\r\n" + get, 0, 2},
		{"HTTP/1.0 falls back", "GET /a HTTP/1.0\r\nHost: web\r\n\r\n", 0, 1},
		{"upgrade falls back", get + "GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 1, 2},
		{"expect falls back", "POST /p HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", 0, 2},
		{"absolute form falls back", "GET http://web/a HTTP/1.1\r\nHost: web\r\n\r\n", 0, 1},
		{"no Host: 400", "GET /a HTTP/1.1\r\n\r\n", 0, 1},
		{"two Hosts: 400", "GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 0, 1},
		{"bad Host: 400", "GET /a HTTP/1.1\r\nHost: a b\r\n\r\n", 0, 1},
		{"bad header value: 400", get + "GET /a HTTP/1.1\r\nHost: web\r\nX: a\x01b\r\n\r\n", 1, 2},
		{"garbage after a request: 400", get + "\x00\x01\x02 nonsense\r\n\r\n", 1, 2},
		{"partial request at EOF", get + "GET /a HTTP/1.1\r\nHo", 1, 2},
		{"header too large: 431", "GET /a HTTP/1.1\r\nHost: web\r\nX-Big: " + strings.Repeat("a", 1<<20+8192) + "\r\n\r\n", 0, 1},
		{"conflicting lengths: 400", "POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 0, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var results [2][]string
			for i, s := range servers {
				h := &leanCount{h: http.HandlerFunc(echoRequest)}
				results[i] = responses(exchange(t, s.serve, h, tc.input))
				if s.name == "lean" && int(h.lean.Load()) != tc.lean {
					t.Errorf("%d requests served on the lean path, want %d", h.lean.Load(), tc.lean)
				}
			}
			if len(results[0]) != tc.want {
				t.Errorf("net/http's server: %d responses, want %d: %q", len(results[0]), tc.want, results[0])
			}
			if fmt.Sprint(results[0]) != fmt.Sprint(results[1]) {
				t.Errorf("the paths differ:\nnet/http: %q\nlean:     %q", results[0], results[1])
			}
		})
	}
}

// An HTTP/2 client with prior knowledge on a port that declares http is
// still served (the preface goes to ServeConn).
func TestServeHTTP1H2CPreface(t *testing.T) {
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeHTTP1(context.Background(), server, http.HandlerFunc(echoPath), 0)
	}()
	tr := &http.Transport{Protocols: new(http.Protocols), DialContext: func(context.Context, string, string) (net.Conn, error) {
		return client, nil
	}}
	tr.Protocols.SetUnencryptedHTTP2(true)
	resp, err := (&http.Client{Transport: tr}).Get("http://x/a")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.HasPrefix(string(body), "HTTP/2.0 GET /a") {
		t.Errorf("got %q", body)
	}
	tr.CloseIdleConnections()
	client.Close()
	<-done
}

func TestServeHTTP1ContextEnds(t *testing.T) {
	client, server := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeHTTP1(ctx, server, http.HandlerFunc(echoPath), time.Minute)
	}()
	cancel()
	<-done
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Error("connection still open after ctx ended")
	}
	client.Close()
}

func TestServeHTTP1IdleTimeout(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeHTTP1(context.Background(), server, http.HandlerFunc(echoPath), 50*time.Millisecond)
	}()
	// The idle timeout applies between requests (before the first, the
	// header timeout does, as in net/http's server).
	if _, err := io.WriteString(client, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.ReadResponse(bufio.NewReader(client), nil); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%v %v", resp, err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("an idle connection was not closed")
	}
}

// WriteResponse streams an upstream's response: a body of unknown length
// is sent chunked (the connection stays open), with its trailers, and what
// has arrived is flushed before waiting for more.
func TestLeanWriteResponse(t *testing.T) {
	upstream := "HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\nX-App: 1\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 7\r\n\r\n"
	closeDelimited := "HTTP/1.0 200 OK\r\nX-App: 2\r\n\r\nuntil the end"
	for _, tc := range []struct {
		name, upstream, body string
		trailer              string
	}{{"chunked with trailer", upstream, "abc", "7"}, {"close-delimited", closeDelimited, "until the end", ""}} {
		t.Run(tc.name, func(t *testing.T) {
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(tc.upstream)), r)
				if err != nil {
					t.Error(err)
					return
				}
				n, err := w.(*LeanWriter).WriteResponse(resp, nil)
				if err != nil || n != int64(len(tc.body)) {
					t.Errorf("WriteResponse: %d bytes, %v", n, err)
				}
			})
			raw := exchange(t, servers[1].serve, h, "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
			br := bufio.NewReader(strings.NewReader(raw))
			for i := range 2 {
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("response %d: %v in %q", i, err, raw)
				}
				body, err := io.ReadAll(resp.Body)
				if err != nil || string(body) != tc.body || resp.Close || resp.ContentLength != -1 || resp.Header.Get("X-App") == "" || resp.Header.Get("Date") == "" {
					t.Errorf("response %d: %v %q close=%v length=%d header %v", i, err, body, resp.Close, resp.ContentLength, resp.Header)
				}
				if resp.Trailer.Get("X-Sum") != tc.trailer {
					t.Errorf("response %d: trailer %v, want X-Sum %q", i, resp.Trailer, tc.trailer)
				}
			}
		})
	}
}

// FuzzServeHTTP1 sends arbitrary bytes to both paths: they must answer
// alike (the lean path serves what it recognises and replays the rest to
// net/http's server), and neither may hang or panic.
func FuzzServeHTTP1(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /deny HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
		"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
		"GET /%2e%2e/x;p?q=1;2 HTTP/1.1\r\nHost: A.example.:80\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\nX: \x7f\r\n\r\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		if len(input) > 64<<10 {
			return
		}
		var results [2][]string
		for i, s := range servers {
			results[i] = responses(exchange(t, s.serve, http.HandlerFunc(echoRequest), input))
		}
		if strings.Contains(input, "HTTP/2.0") {
			// HTTP/2 goes to net/http's HTTP/2 server on both paths;
			// whether it writes its SETTINGS before it sees the client's
			// immediate EOF is a race, so only hangs and panics count
			// (TestServeHTTP1H2CPreface checks the preface is served).
			return
		}
		if fmt.Sprint(results[0]) != fmt.Sprint(results[1]) {
			t.Errorf("input %q: the paths differ:\nnet/http: %q\nlean:     %q", input, results[0], results[1])
		}
	})
}

// writeCounter counts the writes made to it.
type writeCounter struct {
	writes int
	buf    strings.Builder
}

func (w *writeCounter) Write(p []byte) (int, error) {
	w.writes++
	return w.buf.Write(p)
}

// A small request body that arrived with its header is handed to the
// handler in memory, so that forwarding the request (Request.Write) takes
// one write, not a write of the header and another of the body; a body
// still on its way is streamed as before. Either way the body is the one
// sent, and the next request on the connection is served.
func TestLeanBodyInMemory(t *testing.T) {
	for _, tc := range []struct {
		name   string
		split  bool // the body arrives after the header
		writes int
	}{{"with its header", false, 1}, {"after its header", true, 2}} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			forwarded := make(chan *writeCounter, 2)
			done := make(chan struct{})
			go func() {
				defer close(done)
				ServeHTTP1(context.Background(), server, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					r.RequestURI = ""
					wc := &writeCounter{}
					bw := bufio.NewWriter(wc)
					if err := r.Write(bw); err != nil {
						t.Error(err)
					}
					_ = bw.Flush()
					forwarded <- wc
				}), 0)
			}()
			br := bufio.NewReader(client)
			for i := range 2 {
				head := "POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\n"
				if tc.split {
					go func() {
						_, _ = io.WriteString(client, head)
						time.Sleep(20 * time.Millisecond)
						_, _ = io.WriteString(client, "hello")
					}()
				} else {
					go func() { _, _ = io.WriteString(client, head+"hello") }()
				}
				wc := <-forwarded
				if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != http.StatusOK {
					t.Fatalf("request %d: %v %v", i, resp, err)
				}
				if !strings.HasSuffix(wc.buf.String(), "\r\n\r\nhello") || wc.writes != tc.writes {
					t.Errorf("request %d forwarded in %d writes (want %d): %q", i, wc.writes, tc.writes, wc.buf.String())
				}
			}
			client.Close()
			<-done
		})
	}
}

// One connection's writer and response body are reused from request to
// request: forwarded and local answers in any order get exactly their own
// status, header and body.
func TestLeanWriterReused(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/fwd":
			up := "HTTP/1.1 201 Created\r\nX-Up: " + r.URL.RawQuery + "\r\nContent-Length: 8\r\n\r\nupstream"
			resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(up)), r)
			if err != nil {
				t.Error(err)
				return
			}
			if _, err := w.(*LeanWriter).WriteResponse(resp, func() int { return 0 }); err != nil {
				t.Error(err)
			}
		case "/long":
			w.Header().Set("X-Local", "long")
			_, _ = io.WriteString(w, strings.Repeat("L", 500))
		default:
			w.WriteHeader(http.StatusAccepted)
			_, _ = io.WriteString(w, "s")
		}
	})
	req := func(path string) string { return "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n" }
	raw := exchange(t, servers[1].serve, h, req("/fwd?1")+req("/long")+req("/short")+req("/fwd?2")+req("/short"))
	br := bufio.NewReader(strings.NewReader(raw))
	want := []struct {
		status    int
		up, local string
		body      string
	}{
		{201, "1", "", "upstream"}, {200, "", "long", strings.Repeat("L", 500)}, {202, "", "", "s"},
		{201, "2", "", "upstream"}, {202, "", "", "s"},
	}
	for i, w := range want {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != w.status || string(body) != w.body ||
			resp.Header.Get("X-Up") != w.up || resp.Header.Get("X-Local") != w.local || resp.Header.Get("Date") == "" {
			t.Errorf("response %d: %d %q %v, header %v; want %d %q", i, resp.StatusCode, body, err, resp.Header, w.status, w.body)
		}
	}
	if rest, _ := io.ReadAll(br); len(rest) > 0 {
		t.Errorf("%d bytes after the last response: %q", len(rest), rest)
	}
}

// The Date header, formatted once a second, is the time's own in
// http.TimeFormat, also across seconds and back.
func TestHTTPDate(t *testing.T) {
	base := time.Date(2026, 12, 3, 19, 5, 59, 0, time.FixedZone("CET", 3600))
	for _, d := range []time.Duration{0, 300 * time.Millisecond, 999 * time.Millisecond, time.Second, 1500 * time.Millisecond, 0, 61 * time.Second} {
		now := base.Add(d)
		if got, want := httpDate(now), now.UTC().Format(http.TimeFormat); got != want {
			t.Errorf("httpDate(%v) = %q, want %q", now, got, want)
		}
	}
}

// A response body with a length that comes from the upstream in pieces
// reaches the client whole and in order: the client's buffer is flushed
// whenever the next read would wait for the upstream, also while
// net/http's writer is reading the body into that buffer.
func TestLeanWriteResponseBodyInPieces(t *testing.T) {
	body := make([]byte, 20000)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	for _, tc := range []struct {
		name   string
		length string
	}{{"content-length", "Content-Length: 20000\r\n"}, {"chunked", "Transfer-Encoding: chunked\r\n"}} {
		t.Run(tc.name, func(t *testing.T) {
			up := "HTTP/1.1 200 OK\r\n" + tc.length + "\r\n"
			if tc.length[0] == 'T' {
				up += fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(body), body)
			} else {
				up += string(body)
			}
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				// The upstream's bytes come a few hundred at a time.
				br := bufio.NewReaderSize(iotest.HalfReader(strings.NewReader(up)), 4096)
				resp, err := http.ReadResponse(br, r)
				if err != nil {
					t.Error(err)
					return
				}
				if n, err := w.(*LeanWriter).WriteResponse(resp, br.Buffered); err != nil || n != int64(len(body)) {
					t.Errorf("WriteResponse: %d bytes, %v", n, err)
				}
			})
			raw := exchange(t, servers[1].serve, h, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), nil)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			if err != nil || !bytes.Equal(got, body) {
				t.Fatalf("the client got %d bytes (%v), not the upstream's %d; first difference at %d", len(got), err, len(body), firstDiff(got, body))
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
