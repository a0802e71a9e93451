//lint:file-ignore SA1019 x/net/http2 v0.62 deprecates its API in favour of net/http (Go 1.27); this test uses its client as an independent HTTP/2 peer of the server.

package hbone_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/agent/hbone/hbonetest"
	"github.com/nodemesh/nodemesh/agent/internal/leaktest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

func TestMain(m *testing.M) { leaktest.Main(m) }

// env is one trust domain with a client and a server workload.
type env struct {
	ca             *hbonetest.CA
	store          *hbonetest.Store
	tls            hbone.SPIFFETLS
	client, server spiffeid.ID
}

func newEnv(t testing.TB) *env {
	t.Helper()
	ca, err := hbonetest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{ca: ca, store: &hbonetest.Store{}, client: ca.ID("default", "client"), server: ca.ID("default", "server")}
	for _, id := range []spiffeid.ID{e.client, e.server} {
		svid, err := ca.SVID(id)
		if err != nil {
			t.Fatal(err)
		}
		e.store.Add(svid)
	}
	e.tls = hbone.SPIFFETLS{SVID: e.store.Source, Bundles: ca.Bundle()}
	return e
}

// handlerFunc adapts a function to hbone.Handler.
type handlerFunc func(ctx context.Context, req *hbone.Request, t *hbone.Tunnel)

func (f handlerFunc) ServeTunnel(ctx context.Context, req *hbone.Request, t *hbone.Tunnel) {
	f(ctx, req, t)
}

// echo accepts and echoes until the client half-closes, then ends the
// stream.
var echo = handlerFunc(func(_ context.Context, _ *hbone.Request, t *hbone.Tunnel) {
	if err := t.Accept(); err != nil {
		return
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := t.Read(buf)
		if n > 0 {
			if _, werr := t.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
})

func listen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func addrOf(ln net.Listener) netip.AddrPort {
	return netip.MustParseAddrPort(ln.Addr().String())
}

// startServer serves h for e.server on a fresh loopback listener.
func (e *env) startServer(t testing.TB, h hbone.Handler, tweak func(*hbone.ServerConfig)) (*hbone.Server, netip.AddrPort) {
	t.Helper()
	cfg := hbone.ServerConfig{Local: e.server, TLS: e.tls, Handler: h}
	if tweak != nil {
		tweak(&cfg)
	}
	srv, err := hbone.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln := listen(t)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(context.Background(), ln); err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	t.Cleanup(func() {
		srv.Close()
		wg.Wait()
	})
	return srv, addrOf(ln)
}

func (e *env) newPool(t testing.TB, tweak func(*hbone.PoolConfig)) *hbone.Pool {
	t.Helper()
	cfg := hbone.PoolConfig{TLS: e.tls}
	if tweak != nil {
		tweak(&cfg)
	}
	p, err := hbone.NewPool(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func (e *env) key(addr netip.AddrPort) hbone.Key {
	return hbone.Key{Src: e.client, Dst: e.server, Addr: addr}
}

var target = netip.MustParseAddrPort("127.0.0.1:8080")

func connect(t testing.TB, p *hbone.Pool, key hbone.Key) *hbone.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	s, err := p.Connect(ctx, hbone.ConnectRequest{Key: key, Target: target})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// roundTrip sends msg, half-closes, and checks that the echo matches.
func roundTrip(t testing.TB, s *hbone.Stream, msg []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := s.Write(msg)
		if err == nil {
			err = s.CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("reading echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("writing: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo mismatch: sent %d bytes, got %d", len(msg), len(got))
	}
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRoundTripAndHeaders(t *testing.T) {
	e := newEnv(t)
	var got atomic.Pointer[hbone.Request]
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		got.Store(req)
		echo(ctx, req, tun)
	})
	_, addr := e.startServer(t, h, nil)
	p := e.newPool(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hdr := http.Header{"Baggage": {"k8s.namespace.name=default"}}
	s, err := p.Connect(ctx, hbone.ConnectRequest{Key: e.key(addr), Target: target, Header: hdr})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	roundTrip(t, s, randomBytes(t, 3<<20+17))
	req := got.Load()
	if req.Peer != e.client {
		t.Errorf("server saw peer %s, want %s", req.Peer, e.client)
	}
	if req.Target != target {
		t.Errorf("server saw target %s, want %s", req.Target, target)
	}
	if req.Header.Get("Baggage") != "k8s.namespace.name=default" {
		t.Errorf("baggage header lost: %v", req.Header)
	}
}

func TestPoolReuseAndConcurrentFirstStreams(t *testing.T) {
	e := newEnv(t)
	_, addr := e.startServer(t, echo, nil)
	// Scale-out would add a second connection once 16 streams are open
	// (TestScaleOutWhenBusy); here only the first handshake is counted.
	p := e.newPool(t, func(c *hbone.PoolConfig) { c.ScaleOutStreams = -1 })
	key := e.key(addr)

	// Twenty streams race to a new peer: one handshake.
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			s, err := p.Connect(ctx, hbone.ConnectRequest{Key: key, Target: target})
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close()
			roundTrip(t, s, []byte("hello"))
		}()
	}
	wg.Wait()
	st := p.Stats()
	if st.Handshakes != 1 || st.Misses != 1 || st.Hits != 19 {
		t.Fatalf("after 20 concurrent first streams: %+v, want 1 handshake, 1 miss, 19 hits", st)
	}
	// A later stream pays no handshake.
	s := connect(t, p, key)
	roundTrip(t, s, []byte("again"))
	s.Close()
	if st := p.Stats(); st.Handshakes != 1 || st.Hits != 20 || st.Conns != 1 || st.Streams != 0 {
		t.Fatalf("second round: %+v, want still 1 handshake, 20 hits, 1 conn, 0 streams", st)
	}
}

func TestStreamLimitOpensNewConnection(t *testing.T) {
	e := newEnv(t)
	_, addr := e.startServer(t, echo, nil)
	p := e.newPool(t, func(c *hbone.PoolConfig) { c.MaxStreamsPerConn = 2 })
	key := e.key(addr)
	var streams []*hbone.Stream
	for range 5 {
		streams = append(streams, connect(t, p, key))
	}
	if st := p.Stats(); st.Conns != 3 || st.Handshakes != 3 || st.Streams != 5 {
		t.Fatalf("5 streams with limit 2: %+v, want 3 conns, 3 handshakes", st)
	}
	for i, s := range streams {
		roundTrip(t, s, []byte{byte(i)})
	}
}

func TestServerStreamLimitQueuesNotFails(t *testing.T) {
	// The server advertises 2 streams; a pool allowing 100 must still
	// succeed with a third (the pool opens another connection).
	e := newEnv(t)
	_, addr := e.startServer(t, echo, func(c *hbone.ServerConfig) { c.MaxStreams = 2 })
	p := e.newPool(t, nil)
	key := e.key(addr)
	s1, s2 := connect(t, p, key), connect(t, p, key)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s3 := connect(t, p, key)
		roundTrip(t, s3, []byte("third"))
	}()
	roundTrip(t, s1, []byte("one"))
	s1.Close()
	<-done
	roundTrip(t, s2, []byte("two"))
}

func TestIdleRelease(t *testing.T) {
	e := newEnv(t)
	_, addr := e.startServer(t, echo, nil)
	p := e.newPool(t, func(c *hbone.PoolConfig) { c.IdleTimeout = 100 * time.Millisecond })
	key := e.key(addr)
	s := connect(t, p, key)
	roundTrip(t, s, []byte("x"))
	// Busy connections are not released.
	time.Sleep(300 * time.Millisecond)
	if st := p.Stats(); st.Conns != 1 {
		t.Fatalf("connection with an open stream was released: %+v", st)
	}
	s.Close()
	waitfor.True(t, 30*time.Second, "idle connection closed", func() bool { return p.Stats().Conns == 0 })
	s = connect(t, p, key)
	roundTrip(t, s, []byte("y"))
	if st := p.Stats(); st.Handshakes != 2 {
		t.Fatalf("after idle release: %+v, want a second handshake", st)
	}
}

func TestGoAwayReconnectAndDrain(t *testing.T) {
	e := newEnv(t)
	newSrv := func() *hbone.Server {
		srv, err := hbone.NewServer(hbone.ServerConfig{Local: e.server, TLS: e.tls, Handler: echo})
		if err != nil {
			t.Fatal(err)
		}
		return srv
	}
	first, second := newSrv(), newSrv()
	ln := listen(t)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			srv := second
			if i == 0 {
				srv = first
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				srv.ServeConn(context.Background(), c)
			}()
		}
	}()
	defer func() {
		ln.Close()
		first.Close()
		second.Close()
		wg.Wait()
	}()
	p := e.newPool(t, nil)
	key := e.key(addrOf(ln))
	old := connect(t, p, key)
	if _, err := old.Write([]byte("before")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(old, buf); err != nil {
		t.Fatal(err)
	}

	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		drained <- first.Drain(ctx)
	}()
	// New streams move to a new connection once the GOAWAY arrives.
	waitfor.True(t, 30*time.Second, "a stream on a new connection after GOAWAY", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := p.Connect(ctx, hbone.ConnectRequest{Key: key, Target: target})
		if err != nil {
			return false
		}
		roundTrip(t, s, []byte("after"))
		s.Close()
		return p.Stats().Handshakes == 2
	})
	// The old stream keeps working during the drain.
	select {
	case err := <-drained:
		t.Fatalf("Drain returned (%v) while a stream was open", err)
	default:
	}
	roundTrip(t, old, []byte("still here"))
	old.Close()
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("Drain: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Drain did not finish after the last stream ended")
	}
}

func TestDrainDeadlineCutsStreams(t *testing.T) {
	e := newEnv(t)
	srv, addr := e.startServer(t, echo, nil)
	p := e.newPool(t, nil)
	s := connect(t, p, e.key(addr))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := srv.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with an open stream past its deadline: %v, want deadline exceeded", err)
	}
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("stream cut by drain deadline ended cleanly, want an error")
	}
}

func TestRefusals(t *testing.T) {
	e := newEnv(t)
	var served atomic.Int32
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		served.Add(1)
		echo(ctx, req, tun)
	})
	_, addr := e.startServer(t, h, nil)

	other, err := hbonetest.NewCA("evil.local")
	if err != nil {
		t.Fatal(err)
	}
	evilID := other.ID("default", "client")
	evilSVID, err := other.SVID(evilID)
	if err != nil {
		t.Fatal(err)
	}
	evilStore := &hbonetest.Store{}
	evilStore.Add(evilSVID)
	bothBundles := x509bundle.NewSet(e.ca.Bundle(), other.Bundle())

	// A server that federates with evil.local (has its bundle) but does
	// not accept its workloads as peers.
	fedTLS := e.tls
	fedTLS.Bundles = bothBundles
	_, fedAddr := e.startServer(t, h, func(c *hbone.ServerConfig) { c.TLS = fedTLS })

	cases := []struct {
		name string
		tls  hbone.ClientTLS
		key  hbone.Key
	}{
		{"server identity mismatch", e.tls, hbone.Key{Src: e.client, Dst: e.ca.ID("default", "someone-else"), Addr: addr}},
		{"foreign trust domain without bundle", hbone.SPIFFETLS{SVID: evilStore.Source, Bundles: bothBundles}, hbone.Key{Src: evilID, Dst: e.server, Addr: addr}},
		{"foreign trust domain not accepted", hbone.SPIFFETLS{SVID: evilStore.Source, Bundles: bothBundles}, hbone.Key{Src: evilID, Dst: e.server, Addr: fedAddr}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := hbone.NewPool(hbone.PoolConfig{TLS: tc.tls})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			s, err := p.Connect(ctx, hbone.ConnectRequest{Key: tc.key, Target: target})
			if err == nil {
				// TLS 1.3 client auth failures surface on first read.
				_, err = io.ReadAll(s)
				s.Close()
			}
			if err == nil {
				t.Fatal("tunnel opened, want refusal")
			}
			if st := p.Stats(); st.Handshakes != 0 && tc.name == "server identity mismatch" {
				t.Fatalf("handshake counted as success: %+v", st)
			}
		})
	}
	if n := served.Load(); n != 0 {
		t.Fatalf("handler ran %d times for refused peers", n)
	}
}

func TestPlaintextToHBONEPortRefused(t *testing.T) {
	e := newEnv(t)
	var served atomic.Int32
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		served.Add(1)
		tun.Refuse(http.StatusForbidden)
	})
	_, addr := e.startServer(t, h, nil)
	for _, payload := range []string{
		"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"hello, plaintext application bytes\n",
	} {
		c, err := net.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := c.Write([]byte(payload)); err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(c)
		c.Close()
		if bytes.Contains(got, []byte("HTTP/")) || bytes.Contains(got, []byte("hello")) {
			t.Fatalf("plaintext %q got a plaintext answer %q", payload, got)
		}
	}
	if served.Load() != 0 {
		t.Fatal("handler ran for a plaintext connection")
	}
}

// rawClient opens an authenticated HTTP/2 connection without the pool, to
// send requests the pool never would.
func rawClient(t *testing.T, e *env, addr netip.AddrPort) *http2.ClientConn {
	t.Helper()
	cfg, err := e.tls.ClientTLS(e.client, e.server)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.Dial("tcp", addr.String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func TestBadRequests(t *testing.T) {
	e := newEnv(t)
	var served atomic.Int32
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		served.Add(1)
		tun.Refuse(http.StatusUnauthorized)
	})
	_, addr := e.startServer(t, h, nil)
	cc := rawClient(t, e, addr)
	cases := []struct {
		method, authority string
		want              int
	}{
		{"CONNECT", "pod.example:8080", http.StatusBadRequest},
		{"CONNECT", "10.0.0.1", http.StatusBadRequest},
		{"CONNECT", "10.0.0.1:0", http.StatusBadRequest},
		{"CONNECT", "0.0.0.0:80", http.StatusBadRequest},
		{"CONNECT", "[::ffff:10.0.0.1]:80", http.StatusBadRequest},
		{"GET", "10.0.0.1:80", http.StatusBadRequest},
		{"CONNECT", "10.0.0.1:80", http.StatusUnauthorized}, // reaches the handler
	}
	for _, tc := range cases {
		u := &url.URL{Host: tc.authority}
		if tc.method != "CONNECT" {
			u = &url.URL{Scheme: "https", Host: tc.authority, Path: "/"}
		}
		req := &http.Request{Method: tc.method, URL: u, Host: tc.authority, Header: http.Header{}}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.method, tc.authority, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s: status %d, want %d", tc.method, tc.authority, resp.StatusCode, tc.want)
		}
	}
	if n := served.Load(); n != 1 {
		t.Fatalf("handler ran %d times, want once (only for the valid CONNECT)", n)
	}
}

func TestHandlerRefusalReachesClient(t *testing.T) {
	e := newEnv(t)
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		tun.Refuse(http.StatusServiceUnavailable)
	})
	_, addr := e.startServer(t, h, nil)
	p := e.newPool(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := p.Connect(ctx, hbone.ConnectRequest{Key: e.key(addr), Target: target})
	var ce *hbone.ConnectError
	if !errors.As(err, &ce) || ce.Status != http.StatusServiceUnavailable {
		t.Fatalf("Connect: %v, want ConnectError 503", err)
	}
	if st := p.Stats(); st.Streams != 0 {
		t.Fatalf("refused stream still counted: %+v", st)
	}
}

func TestConnectToDeadPeerFailsFast(t *testing.T) {
	e := newEnv(t)
	ln := listen(t)
	addr := addrOf(ln)
	ln.Close() // nothing listens: connection refused
	p := e.newPool(t, nil)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := p.Connect(ctx, hbone.ConnectRequest{Key: e.key(addr), Target: target}); err == nil {
		t.Fatal("Connect to a closed port succeeded")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("Connect to a closed port took %v", d)
	}
	if st := p.Stats(); st.HandshakeErrors != 1 {
		t.Fatalf("%+v, want 1 handshake error", st)
	}
}

func TestResetReachesClient(t *testing.T) {
	e := newEnv(t)
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		if tun.Accept() != nil {
			return
		}
		tun.Write([]byte("partial"))
		tun.Reset()
	})
	_, addr := e.startServer(t, h, nil)
	p := e.newPool(t, nil)
	s := connect(t, p, e.key(addr))
	got, err := io.ReadAll(s)
	if err == nil {
		t.Fatalf("reset stream read cleanly (%q), want an error", got)
	}
}

func TestServerCloseResetsStreams(t *testing.T) {
	e := newEnv(t)
	srv, addr := e.startServer(t, echo, nil)
	p := e.newPool(t, nil)
	s := connect(t, p, e.key(addr))
	srv.Close()
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("stream ended cleanly after server Close, want an error")
	}
}

func TestConfigValidation(t *testing.T) {
	e := newEnv(t)
	if _, err := hbone.NewPool(hbone.PoolConfig{}); err == nil {
		t.Error("NewPool without TLS succeeded")
	}
	if _, err := hbone.NewPool(hbone.PoolConfig{TLS: e.tls, Flow: hbone.FlowControl{StreamWindow: 100}}); err == nil {
		t.Error("NewPool with a 100-byte window succeeded")
	}
	if _, err := hbone.NewServer(hbone.ServerConfig{TLS: e.tls, Handler: echo}); err == nil {
		t.Error("NewServer without a local identity succeeded")
	}
	if _, err := e.tls.ClientTLS(e.client, spiffeid.ID{}); err == nil {
		t.Error("ClientTLS with an empty destination identity succeeded")
	}
	if _, err := e.tls.ServerTLS(e.ca.ID("default", "unknown")); err == nil {
		t.Error("ServerTLS for a workload without an SVID succeeded")
	}
}

func TestDialSeesKeyAndNetnsSeparatesConnections(t *testing.T) {
	e := newEnv(t)
	_, addr := e.startServer(t, echo, nil)
	var mu sync.Mutex
	var seen []string
	p := e.newPool(t, func(c *hbone.PoolConfig) {
		c.Dial = func(ctx context.Context, network, address string) (net.Conn, error) {
			key, ok := hbone.KeyFromContext(ctx)
			if !ok {
				return nil, errors.New("no key in dial context")
			}
			mu.Lock()
			seen = append(seen, key.SrcNetns)
			mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, network, address)
		}
	})
	for _, ns := range []string{"pod-1", "pod-2", "pod-1"} {
		key := e.key(addr)
		key.SrcNetns = ns
		s := connect(t, p, key)
		roundTrip(t, s, []byte(ns))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0] != "pod-1" || seen[1] != "pod-2" {
		t.Fatalf("dials for %v; want one per source namespace", seen)
	}
}
