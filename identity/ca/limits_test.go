package ca_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
	"github.com/nodemesh/nodemesh/identity/identitytest"
	"github.com/nodemesh/nodemesh/identity/svid"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// limitCA is a CA server on 127.0.0.1 with test doubles behind it and
// the limits a test sets.
type limitCA struct {
	srv     *ca.Server
	a       *ca.Authority
	metrics *ca.Metrics
	addr    string
	log     *identitytest.SyncBuffer
}

func newLimitCA(t *testing.T, pods ca.PodFinder, tweak func(*ca.ServerConfig)) *limitCA {
	t.Helper()
	root, err := ca.NewRootSigner(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: root, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if pods == nil {
		p := &identitytest.Pods{}
		p.Put("node-a", identity.Workload{Namespace: "app", ServiceAccount: "web"}, "web-1")
		pods = p
	}
	logs := &identitytest.SyncBuffer{}
	id, _ := identity.WorkloadID(td, "nodemesh-system", "nodemesh-ca")
	cfg := ca.ServerConfig{
		Authority: a, Pods: pods, ServingID: id, Metrics: ca.NewMetrics(nil),
		Authn: &identitytest.Authn{Callers: map[string]ca.Caller{"agent-a": {User: "agent", Node: "node-a"}}},
		Log:   slog.New(slog.NewJSONHandler(logs, nil)),
	}
	if tweak != nil {
		tweak(&cfg)
	}
	srv, err := ca.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("CA shutdown: %v", err)
		}
	})
	return &limitCA{srv: srv, a: a, metrics: cfg.Metrics, addr: ln.Addr().String(), log: logs}
}

// sign asks for an SVID as an agent would (svid.Client over TLS 1.3 with
// the CA's identity checked) and returns the refusal code, or "" on success.
func (c *limitCA) sign(t *testing.T, token string) identity.Code {
	t.Helper()
	cl, err := svid.NewClient(svid.ClientConfig{
		URL: "https://" + c.addr, CAID: spiffeid.RequireFromString("spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-ca"),
		Bundle: x509bundle.FromX509Authorities(td, c.a.Bundle()),
		Token:  func(context.Context) (string, error) { return token, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = cl.Sign(ctx, spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/web"), csrFor(t, p256(t), nil))
	var ref *identity.RefusedError
	switch {
	case err == nil:
		return ""
	case errors.As(err, &ref):
		return ref.Code
	}
	t.Fatalf("sign: %v", err)
	return ""
}

// attacker is a raw TLS client from its own loopback address (so that
// per-caller limits tell attackers and the agent apart, as pod IPs and
// node IPs do in a cluster).
type attacker struct {
	conn *tls.Conn
}

func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dialling from %s: %v", src, err)
	}
	return c
}

// slowBody opens a TLS connection from src and sends the headers of a
// sign request announcing a 64 KiB body, then one byte of it, and stops:
// the slow-body attack of issue 14.
func slowBody(t *testing.T, src, addr string) *attacker {
	t.Helper()
	tc := tls.Client(dialFrom(t, src, addr), &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, NextProtos: []string{"http/1.1"}})
	if err := tc.Handshake(); err != nil {
		tc.Close()
		t.Fatalf("attacker handshake from %s: %v", src, err)
	}
	if _, err := fmt.Fprintf(tc, "POST %s HTTP/1.1\r\nHost: ca\r\nAuthorization: Bearer x.y.z\r\nContent-Length: %d\r\n\r\n{", identity.SignPath, identity.MaxRequestBytes); err != nil {
		tc.Close()
		t.Fatalf("attacker write: %v", err)
	}
	return &attacker{conn: tc}
}

// TestSlowBodyDoesNotStopTheCA is the attack of issue 14: more slow-body
// requests than the CA has in-flight slots, each from its own address.
// Before the fix each held a slot for the 30 s read timeout and the agent
// got 503; now a request takes a slot only once read and authenticated.
func TestSlowBodyDoesNotStopTheCA(t *testing.T) {
	c := newLimitCA(t, nil, func(cfg *ca.ServerConfig) {
		cfg.MaxInFlight = 8
		cfg.BodyTimeout = time.Hour // the attackers are held for the whole test
	})
	const n = 24 // three times the slots
	var atk []*attacker
	defer func() {
		for _, a := range atk {
			a.conn.Close()
		}
	}()
	for i := range n {
		atk = append(atk, slowBody(t, fmt.Sprintf("127.0.1.%d", i+1), c.addr))
	}
	waitfor.True(t, 30*time.Second, "all attackers to be reading their bodies", func() bool { return c.metrics.ReadingBody() == n })
	for i := range 3 {
		if code := c.sign(t, "agent-a"); code != "" {
			t.Fatalf("agent request %d during the attack refused: %s", i, code)
		}
	}
	if got := c.metrics.LimitHits(ca.LimitInFlight); got != 0 {
		t.Errorf("in-flight limit hit %v times; slow bodies must not hold slots", got)
	}
	if got := c.metrics.Requests("issued"); got != 3 {
		t.Errorf("issued %v SVIDs, want 3", got)
	}
}

// TestBodyTimeoutCutsSlowBodies checks that a stalled body is cut after
// BodyTimeout, counted and logged once.
func TestBodyTimeoutCutsSlowBodies(t *testing.T) {
	c := newLimitCA(t, nil, func(cfg *ca.ServerConfig) { cfg.BodyTimeout = 100 * time.Millisecond })
	for i := range 3 {
		a := slowBody(t, "127.0.2.1", c.addr)
		resp, err := http.ReadResponse(bufio.NewReader(a.conn), nil)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("attempt %d: status %d, want 400 or a closed connection", i, resp.StatusCode)
			}
		}
		a.conn.Close()
	}
	waitfor.True(t, 30*time.Second, "three body timeouts counted", func() bool { return c.metrics.LimitHits(ca.LimitBodyTimeout) == 3 })
	if n := strings.Count(c.log.String(), `"limit":"body_timeout"`); n != 1 {
		t.Errorf("body timeout logged %d times, want once (then at most once a minute):\n%s", n, c.log)
	}
	if c.metrics.ReadingBody() != 0 {
		t.Errorf("%v requests still reading", c.metrics.ReadingBody())
	}
}

// TestPerCallerLimits checks each per-caller limit against a caller that
// exceeds it, and that the agent (another address) is unaffected.
func TestPerCallerLimits(t *testing.T) {
	c := newLimitCA(t, nil, func(cfg *ca.ServerConfig) {
		cfg.MaxConnsPerCaller = 4
		cfg.MaxPerCaller = 2
		cfg.AuthFailureBurst = 3
		cfg.AuthFailureRate = 1e-6 // no refill during the test
		cfg.HeaderTimeout = time.Hour
		cfg.BodyTimeout = time.Hour
	})

	t.Run("connections", func(t *testing.T) {
		var held []net.Conn
		defer func() {
			for _, h := range held {
				h.Close()
			}
		}()
		for range 4 {
			held = append(held, dialFrom(t, "127.0.3.1", c.addr))
		}
		extra := dialFrom(t, "127.0.3.1", c.addr)
		defer extra.Close()
		// The fifth connection is closed at accept, before any TLS.
		_ = extra.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := extra.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
			t.Fatalf("fifth connection from one caller: read %v, want it closed", err)
		}
		// The listener counts the refusal after it closed the connection,
		// so the client can see the close first.
		waitfor.True(t, 30*time.Second, "the refusal counted", func() bool { return c.metrics.LimitHits(ca.LimitConnsPerCaller) >= 1 })
		if got := c.metrics.LimitHits(ca.LimitConnsPerCaller); got != 1 {
			t.Errorf("conns_per_caller hits %v, want 1", got)
		}
		if code := c.sign(t, "agent-a"); code != "" {
			t.Fatalf("agent refused while another caller is at its connection limit: %s", code)
		}
		for _, h := range held {
			h.Close()
		}
		held = nil
		// Closed connections give the budget back.
		waitfor.True(t, 30*time.Second, "the caller's connections to be released", func() bool {
			tc := tls.Client(dialFrom(t, "127.0.3.1", c.addr), &tls.Config{InsecureSkipVerify: true})
			defer tc.Close()
			return tc.Handshake() == nil
		})
	})

	t.Run("requests", func(t *testing.T) {
		a1, a2 := slowBody(t, "127.0.3.2", c.addr), slowBody(t, "127.0.3.2", c.addr)
		defer a1.conn.Close()
		defer a2.conn.Close()
		waitfor.True(t, 30*time.Second, "two requests reading", func() bool { return c.metrics.ReadingBody() == 2 })
		a3 := slowBody(t, "127.0.3.2", c.addr)
		defer a3.conn.Close()
		resp, err := http.ReadResponse(bufio.NewReader(a3.conn), nil)
		if err != nil {
			t.Fatalf("third request of one caller: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
			t.Errorf("third request of one caller: %d, want 503 with Retry-After", resp.StatusCode)
		}
		if got := c.metrics.LimitHits(ca.LimitPerCaller); got != 1 {
			t.Errorf("requests_per_caller hits %v, want 1", got)
		}
		if code := c.sign(t, "agent-a"); code != "" {
			t.Fatalf("agent refused while another caller is at its request limit: %s", code)
		}
	})

	t.Run("auth failures", func(t *testing.T) {
		post := func() int {
			tc := tls.Client(dialFrom(t, "127.0.3.3", c.addr), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
			defer tc.Close()
			body := `{}`
			if _, err := fmt.Fprintf(tc, "POST %s HTTP/1.1\r\nHost: ca\r\nAuthorization: Bearer forged\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", identity.SignPath, len(body), body); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		for i := range 3 {
			if st := post(); st != http.StatusUnauthorized {
				t.Fatalf("forged token %d: status %d, want 401", i, st)
			}
		}
		if st := post(); st != http.StatusServiceUnavailable {
			t.Fatalf("after the failure budget: status %d, want 503", st)
		}
		if got := c.metrics.LimitHits(ca.LimitAuthFailures); got != 1 {
			t.Errorf("auth failure limit hits %v, want 1", got)
		}
		if code := c.sign(t, "agent-a"); code != "" {
			t.Fatalf("agent refused while another caller is out of failures: %s", code)
		}
	})

	t.Run("body size", func(t *testing.T) {
		tc := tls.Client(dialFrom(t, "127.0.3.4", c.addr), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
		defer tc.Close()
		if _, err := fmt.Fprintf(tc, "POST %s HTTP/1.1\r\nHost: ca\r\nContent-Length: %d\r\n\r\n", identity.SignPath, identity.MaxRequestBytes+1); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || c.metrics.LimitHits(ca.LimitBodySize) != 1 {
			t.Errorf("oversized body: status %d, body_size hits %v; want 400 and 1", resp.StatusCode, c.metrics.LimitHits(ca.LimitBodySize))
		}
	})
}

// blockingPods holds every pod check until release is closed.
type blockingPods struct {
	entered chan struct{}
	release chan struct{}
}

func (b *blockingPods) RunningPod(ctx context.Context, node string, w identity.Workload) (string, error) {
	b.entered <- struct{}{}
	select {
	case <-b.release:
		return "web-1", nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// TestInFlightOnlyAfterAuthentication fills the in-flight slots with
// authenticated requests: another agent request is refused (503), but an
// unauthenticated one is still answered with 401, so it took no slot.
func TestInFlightOnlyAfterAuthentication(t *testing.T) {
	pods := &blockingPods{entered: make(chan struct{}, 1), release: make(chan struct{})}
	c := newLimitCA(t, pods, func(cfg *ca.ServerConfig) { cfg.MaxInFlight = 1 })
	first := make(chan identity.Code, 1)
	go func() { first <- c.sign(t, "agent-a") }()
	<-pods.entered
	if code := c.sign(t, "agent-a"); code != identity.CodeUnavailable {
		t.Errorf("second agent request with the only slot taken: %q, want %s", code, identity.CodeUnavailable)
	}
	if code := c.sign(t, "nobody"); code != identity.CodeTokenInvalid {
		t.Errorf("unauthenticated request with the only slot taken: %q, want %s", code, identity.CodeTokenInvalid)
	}
	close(pods.release)
	if code := <-first; code != "" {
		t.Errorf("first request: %s", code)
	}
	if got := c.metrics.LimitHits(ca.LimitInFlight); got != 1 {
		t.Errorf("in_flight hits %v, want 1", got)
	}
}

// TestHTTP2StreamsPerCaller checks that HTTP/2 streams count against the
// per-caller request limit like connections do.
func TestHTTP2StreamsPerCaller(t *testing.T) {
	c := newLimitCA(t, nil, func(cfg *ca.ServerConfig) { cfg.MaxPerCaller = 2; cfg.BodyTimeout = time.Hour })
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.4.1")}}
			return d.DialContext(ctx, "tcp", addr)
		},
	}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	for range 2 {
		pr, pw := io.Pipe()
		defer pw.Close()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+c.addr+identity.SignPath, pr)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if resp, err := hc.Do(req); err == nil {
				resp.Body.Close()
			}
		}()
		_, _ = pw.Write([]byte("{"))
	}
	waitfor.True(t, 30*time.Second, "two streams reading", func() bool { return c.metrics.ReadingBody() == 2 })
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+c.addr+identity.SignPath, strings.NewReader("{}"))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("third stream: HTTP/%d %d, want HTTP/2 503", resp.ProtoMajor, resp.StatusCode)
	}
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// FuzzSignHandler feeds arbitrary HTTP requests to the CA's handler: it
// must never crash, never answer 500, answer every refusal with a JSON
// ErrorResponse, and issue an SVID only to the agent's token.
func FuzzSignHandler(f *testing.F) {
	root, err := ca.NewRootSigner(td, 24*time.Hour, time.Now())
	if err != nil {
		f.Fatal(err)
	}
	a, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: td, Signer: root, TTL: time.Hour})
	if err != nil {
		f.Fatal(err)
	}
	pods := &identitytest.Pods{}
	pods.Put("node-a", identity.Workload{Namespace: "app", ServiceAccount: "web"}, "web-1")
	srv, err := ca.NewServer(ca.ServerConfig{
		Authority: a, Pods: pods, ServingID: spiffeid.RequireFromString("spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-ca"),
		Authn:            &identitytest.Authn{Callers: map[string]ca.Caller{"agent-a": {User: "agent", Node: "node-a"}}},
		Log:              slog.New(slog.DiscardHandler),
		AuthFailureBurst: 1 << 30, // the fuzzer fails a lot from one address
	})
	if err != nil {
		f.Fatal(err)
	}
	h := srv.Handler()
	good := body(f, "spiffe://cluster.local/ns/app/sa/web", csrFor(f, p256(f), nil))
	f.Add([]byte(fmt.Sprintf("POST /v1/sign HTTP/1.1\r\nHost: ca\r\nAuthorization: Bearer agent-a\r\nContent-Length: %d\r\n\r\n%s", len(good), good)))
	f.Add([]byte(fmt.Sprintf("POST /v1/sign HTTP/1.1\r\nHost: ca\r\nAuthorization: Bearer nobody\r\nContent-Length: %d\r\n\r\n%s", len(good), good)))
	f.Add([]byte("POST /v1/sign HTTP/1.1\r\nHost: ca\r\nAuthorization: Bearer agent-a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n"))
	f.Add([]byte("POST /v1/sign HTTP/1.1\r\nHost: ca\r\nContent-Length: 99999999\r\n\r\n{"))
	f.Add([]byte("GET /v1/bundle HTTP/1.1\r\nHost: ca\r\n\r\n"))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			return
		}
		req.RemoteAddr = "192.0.2.1:40000"
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code >= 500 && rec.Code != http.StatusServiceUnavailable {
			t.Fatalf("status %d for %q: %s", rec.Code, raw, rec.Body)
		}
		if req.Method != http.MethodPost || req.URL.Path != identity.SignPath {
			return
		}
		if rec.Code == http.StatusOK {
			if req.Header.Get("Authorization") != "Bearer agent-a" && strings.TrimSpace(strings.TrimPrefix(req.Header.Get("Authorization"), "Bearer ")) != "agent-a" {
				t.Fatalf("issued to Authorization %q", req.Header.Get("Authorization"))
			}
			var sr identity.SignResponse
			if err := json.Unmarshal(rec.Body.Bytes(), &sr); err != nil || len(sr.Chain) == 0 {
				t.Fatalf("200 without an SVID: %v %s", err, rec.Body)
			}
			return
		}
		var er identity.ErrorResponse
		if err := json.Unmarshal(rec.Body.Bytes(), &er); err != nil || er.Code == "" || er.Message == "" {
			t.Fatalf("refusal %d is not an ErrorResponse: %v %s", rec.Code, err, rec.Body)
		}
	})
}
