//lint:file-ignore SA1019 x/net/http2 v0.62 deprecates its API in favour of net/http (where HTTP/2 moves in Go 1.27); these tests use it as the reference HTTP/2 peer, see docs/hbone.md.

package hbone_test

// Wire compatibility with a plain golang.org/x/net/http2 peer (issue 12,
// "Wire compatibility, proven in tests"): hbone's client against an
// http2.Server with a CONNECT handler, and an http2.Transport ClientConn
// against hbone.Server, both over SPIFFE mutual TLS. The tests are written
// against the public API only, so they hold for whichever engine
// agent/hbone carries. docs/hbone.md ("Conformance") has the matrix.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"

	"github.com/nodemesh/nodemesh/agent/hbone"
)

// serverEnd is the server end of one CONNECT stream, the same for both
// servers, so that one test body runs against each.
type serverEnd struct {
	peer      spiffeid.ID // from the client's verified SVID
	authority string
	header    http.Header
	accept    func() error
	refuse    func(status int)
	reset     func() // end with RST_STREAM when the app returns
	// closeWrite half-closes the response direction (END_STREAM) while
	// the request direction stays readable; nil where the server can end
	// a response only by returning from its handler (x/net/http2).
	closeWrite func() error
	io.Reader
	io.Writer
}

// tunnelApp is what sits behind the server end of a tunnel. Returning ends
// the stream.
type tunnelApp func(s *serverEnd)

// hboneApp serves app on hbone.Server.
func hboneApp(app tunnelApp) hbone.Handler {
	return handlerFunc(func(_ context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		app(&serverEnd{
			peer: req.Peer, authority: req.Target.String(), header: req.Header,
			accept: tun.Accept, refuse: tun.Refuse, reset: tun.Reset, closeWrite: tun.CloseWrite,
			Reader: tun, Writer: tun,
		})
	})
}

// flushWriter flushes every write, as hbone.Tunnel does.
type flushWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if err == nil {
		err = f.rc.Flush()
	}
	return n, err
}

// startXNetServer serves app with a plain x/net/http2 server behind the
// server workload's SVID, over mutual TLS with the same go-spiffe config
// hbone.Server uses. Like an HBONE server it answers anything but CONNECT
// with 400.
func startXNetServer(t testing.TB, e *env, app tunnelApp) netip.AddrPort {
	t.Helper()
	cfg, err := e.tls.ServerTLS(e.server)
	if err != nil {
		t.Fatal(err)
	}
	h2 := &http2.Server{}
	// handler serves the streams of one connection from peer. (x/net sets
	// Request.TLS only for requests with :scheme https, which a CONNECT
	// has not.)
	handler := func(peer spiffeid.ID) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodConnect {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			rc := http.NewResponseController(w)
			reset := false
			s := &serverEnd{
				peer: peer, authority: r.Host, header: r.Header,
				accept: func() error {
					w.WriteHeader(http.StatusOK)
					return rc.Flush()
				},
				refuse: func(status int) { w.WriteHeader(status) },
				reset:  func() { reset = true },
				Reader: r.Body, Writer: flushWriter{w, rc},
			}
			app(s)
			if reset {
				// x/net/http2 answers this panic with RST_STREAM.
				panic(http.ErrAbortHandler)
			}
		})
	}
	ln := listen(t)
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				tc := tls.Server(c, cfg)
				hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
				err := tc.HandshakeContext(hctx)
				hcancel()
				if err != nil {
					return
				}
				peer, err := hbone.PeerID(tc.ConnectionState())
				if err != nil {
					return
				}
				h2.ServeConn(tc, &http2.ServeConnOpts{Context: ctx, Handler: handler(peer)})
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		// Handlers end when their connection does; TestMain's leak check
		// waits for them.
		wg.Wait()
	})
	return addrOf(ln)
}

// clientStream is the client end of a CONNECT stream. *hbone.Stream is one.
type clientStream interface {
	io.Reader
	io.Writer
	CloseWrite() error
	Close() error
}

// xnetStream is a CONNECT stream opened by a plain x/net/http2 ClientConn
// with a pipe as its request body.
type xnetStream struct {
	resp   *http.Response
	pw     *io.PipeWriter
	cancel context.CancelFunc
}

func (s *xnetStream) Read(p []byte) (int, error)  { return s.resp.Body.Read(p) }
func (s *xnetStream) Write(p []byte) (int, error) { return s.pw.Write(p) }
func (s *xnetStream) CloseWrite() error           { return s.pw.Close() }
func (s *xnetStream) Close() error {
	s.pw.CloseWithError(net.ErrClosed)
	err := s.resp.Body.Close() // RST_STREAM(CANCEL) unless both sides ended
	s.cancel()
	return err
}

// dialXNet opens one x/net/http2 client connection to addr, presenting the
// client workload's SVID and requiring the server's.
func dialXNet(t testing.TB, e *env, addr string) *http2.ClientConn {
	t.Helper()
	cfg, err := e.tls.ClientTLS(e.client, e.server)
	if err != nil {
		t.Fatal(err)
	}
	d := tls.Dialer{Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// openXNet sends a CONNECT for target on cc. A status other than 200 comes
// back as *hbone.ConnectError, as from hbone.Pool.
func openXNet(ctx context.Context, cc *http2.ClientConn, authority string, hdr http.Header) (clientStream, error) {
	if hdr == nil {
		hdr = http.Header{}
	}
	pr, pw := io.Pipe()
	ctx, cancel := context.WithCancel(ctx)
	req := (&http.Request{
		Method: http.MethodConnect, URL: &url.URL{Host: authority}, Host: authority,
		Header: hdr, Body: pr, ContentLength: -1,
	}).WithContext(ctx)
	resp, err := cc.RoundTrip(req)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("CONNECT %s: %w", authority, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("CONNECT %s: %w", authority, &hbone.ConnectError{Status: resp.StatusCode})
	}
	return &xnetStream{resp: resp, pw: pw, cancel: cancel}, nil
}

// interopPair is one cell of the matrix: a client implementation against a
// server implementation.
type interopPair struct {
	name string
	// start serves app and returns how to open streams to it.
	start func(t *testing.T, e *env, app tunnelApp) (open func(ctx context.Context, hdr http.Header) (clientStream, error))
	// closeWriteless: the server cannot half-close (the reference
	// x/net/http2 server).
	closeWriteless bool
}

func poolOpener(t *testing.T, e *env, addr netip.AddrPort) func(ctx context.Context, hdr http.Header) (clientStream, error) {
	p := e.newPool(t, nil)
	key := e.key(addr)
	return func(ctx context.Context, hdr http.Header) (clientStream, error) {
		s, err := p.Connect(ctx, hbone.ConnectRequest{Key: key, Target: target, Header: hdr})
		if err != nil {
			return nil, err
		}
		return s, nil
	}
}

func xnetOpener(t *testing.T, e *env, addr netip.AddrPort) func(ctx context.Context, hdr http.Header) (clientStream, error) {
	cc := dialXNet(t, e, addr.String())
	return func(ctx context.Context, hdr http.Header) (clientStream, error) {
		return openXNet(ctx, cc, target.String(), hdr)
	}
}

var interopMatrix = []interopPair{
	{
		name: "pool-to-xnet-server", closeWriteless: true,
		start: func(t *testing.T, e *env, app tunnelApp) func(context.Context, http.Header) (clientStream, error) {
			return poolOpener(t, e, startXNetServer(t, e, app))
		},
	},
	{
		name: "xnet-client-to-server",
		start: func(t *testing.T, e *env, app tunnelApp) func(context.Context, http.Header) (clientStream, error) {
			_, addr := e.startServer(t, hboneApp(app), nil)
			return xnetOpener(t, e, addr)
		},
	},
	{
		name: "pool-to-server",
		start: func(t *testing.T, e *env, app tunnelApp) func(context.Context, http.Header) (clientStream, error) {
			_, addr := e.startServer(t, hboneApp(app), nil)
			return poolOpener(t, e, addr)
		},
	},
}

// forEachPair runs fn once per cell of the matrix, each with its own
// servers, clients and a deadline that catches hangs.
func forEachPair(t *testing.T, fn func(t *testing.T, ctx context.Context, e *env, p interopPair)) {
	for _, p := range interopMatrix {
		t.Run(p.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			fn(t, ctx, newEnv(t), p)
		})
	}
}

// echoApp accepts and echoes until the client half-closes.
func echoApp(s *serverEnd) {
	if s.accept() != nil {
		return
	}
	_, _ = io.Copy(s, s)
}

func TestInteropRoundTripAndIdentity(t *testing.T) {
	forEachPair(t, func(t *testing.T, ctx context.Context, e *env, p interopPair) {
		type seen struct {
			peer      spiffeid.ID
			authority string
			baggage   string
		}
		got := make(chan seen, 1)
		open := p.start(t, e, func(s *serverEnd) {
			got <- seen{s.peer, s.authority, s.header.Get("Baggage")}
			echoApp(s)
		})
		hdr := http.Header{"Baggage": {"k8s.namespace.name=default"}}
		s, err := open(ctx, hdr)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		exchange(t, s, []byte("hello across implementations"))
		g := <-got
		if g.peer != e.client {
			t.Errorf("server saw peer %s, want %s", g.peer, e.client)
		}
		if g.authority != target.String() {
			t.Errorf("server saw :authority %q, want %q", g.authority, target)
		}
		if g.baggage != "k8s.namespace.name=default" {
			t.Errorf("server saw baggage %q", g.baggage)
		}
	})
}

// exchange writes msg, half-closes and checks that the same bytes come
// back, reading and writing concurrently (an echo needs both).
func exchange(t testing.TB, s clientStream, msg []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		err := writeChunks(s, msg)
		if err == nil {
			err = s.CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(s)
	werr := <-errc
	if err != nil {
		t.Fatalf("reading: %v (after %d of %d bytes)", err, len(got), len(msg))
	}
	if werr != nil {
		t.Fatalf("writing: %v", werr)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("sent %d bytes, got %d back, differing", len(msg), len(got))
	}
}

// writeChunks writes b in 64 KiB writes, as the agent's copy loop does.
func writeChunks(w io.Writer, b []byte) error {
	for len(b) > 0 {
		n := min(len(b), 64<<10)
		if _, err := w.Write(b[:n]); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func TestInteropFlowControlConcurrentStreams(t *testing.T) {
	// Three streams on one connection, each moving more than a stream
	// window in each direction and together more than a connection
	// window: the transfer completes only if both ends send
	// WINDOW_UPDATEs for stream and connection as they consume.
	const streams = 3
	per := hbone.DefaultStreamWindow + hbone.DefaultConnWindow/streams/2 + 1
	if streams*per <= hbone.DefaultConnWindow {
		t.Fatalf("test moves %d bytes, not more than the %d connection window", streams*per, hbone.DefaultConnWindow)
	}
	forEachPair(t, func(t *testing.T, ctx context.Context, e *env, p interopPair) {
		open := p.start(t, e, echoApp)
		var wg sync.WaitGroup
		for i := range streams {
			s, err := open(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			msg := randomBytes(t, per+i)
			wg.Add(1)
			go func() {
				defer wg.Done()
				exchange(t, s, msg)
			}()
		}
		wg.Wait()
	})
}

// digest is what one side of a transfer saw.
type digest struct {
	n   int64
	sum [sha256.Size]byte
	err error
}

func readDigest(r io.Reader) digest {
	h := sha256.New()
	n, err := io.Copy(h, r)
	d := digest{n: n, err: err}
	copy(d.sum[:], h.Sum(nil))
	return d
}

func TestInteropHalfCloseSourceFirst(t *testing.T) {
	// The client sends more than a connection window and half-closes; the
	// server reads to EOF and only then answers with as much again. Both
	// directions cross both windows on one stream, and the server's
	// direction starts only after the client's has ended.
	size := hbone.DefaultConnWindow + 1<<20 + 7
	forEachPair(t, func(t *testing.T, ctx context.Context, e *env, p interopPair) {
		up, down := randomBytes(t, size), randomBytes(t, size)
		seen := make(chan digest, 1)
		open := p.start(t, e, func(s *serverEnd) {
			if s.accept() != nil {
				return
			}
			d := readDigest(s)
			seen <- d
			if d.err == nil {
				_ = writeChunks(s, down)
			}
		})
		s, err := open(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		werr := make(chan error, 1)
		go func() {
			err := writeChunks(s, up)
			if err == nil {
				err = s.CloseWrite()
			}
			werr <- err
		}()
		got := readDigest(s)
		if err := <-werr; err != nil {
			t.Fatalf("client writing: %v", err)
		}
		if d := <-seen; d.err != nil || d.n != int64(size) || d.sum != sha256.Sum256(up) {
			t.Fatalf("server received %d bytes (err %v), want %d intact", d.n, d.err, size)
		}
		if got.err != nil || got.n != int64(size) || got.sum != sha256.Sum256(down) {
			t.Fatalf("client received %d bytes after its half-close (err %v), want %d intact then EOF", got.n, got.err, size)
		}
	})
}

func TestInteropHalfCloseDestinationFirst(t *testing.T) {
	// The server sends its answer and half-closes; the client reads it to
	// EOF and only then sends more than a stream window, which the server
	// must receive in full. This was the gap of issue 12: the x/net/http2
	// server could end a response only by ending the handler, and then
	// reset the request direction, so the source's later bytes were lost.
	const down = 1 << 20
	up := hbone.DefaultStreamWindow + 1<<20 + 3
	forEachPair(t, func(t *testing.T, ctx context.Context, e *env, p interopPair) {
		if p.closeWriteless {
			t.Skip("not applicable: the reference x/net/http2 server cannot half-close a response (it ends the response only by returning from the handler)")
		}
		downMsg, upMsg := randomBytes(t, down), randomBytes(t, up)
		seen := make(chan digest, 1)
		open := p.start(t, e, func(s *serverEnd) {
			if s.accept() != nil {
				return
			}
			if err := writeChunks(s, downMsg); err != nil {
				seen <- digest{err: fmt.Errorf("server writing: %w", err)}
				return
			}
			if err := s.closeWrite(); err != nil {
				seen <- digest{err: fmt.Errorf("server half-closing: %w", err)}
				return
			}
			seen <- readDigest(s)
		})
		s, err := open(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		got := readDigest(s)
		if got.err != nil || got.n != down || got.sum != sha256.Sum256(downMsg) {
			t.Fatalf("client received %d bytes (err %v), want %d then EOF", got.n, got.err, down)
		}
		// The server has half-closed; the client's direction is still open.
		if err := writeChunks(s, upMsg); err != nil {
			t.Fatalf("client writing after the server half-closed: %v", err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatalf("client half-closing: %v", err)
		}
		select {
		case d := <-seen:
			if d.err != nil || d.n != int64(up) || d.sum != sha256.Sum256(upMsg) {
				t.Fatalf("server received %d bytes after its half-close (err %v), want %d intact then EOF", d.n, d.err, up)
			}
		case <-ctx.Done():
			t.Fatal("server never saw the client's END_STREAM")
		}
	})
}

func TestInteropServerReset(t *testing.T) {
	forEachPair(t, func(t *testing.T, ctx context.Context, e *env, p interopPair) {
		open := p.start(t, e, func(s *serverEnd) {
			if s.accept() != nil {
				return
			}
			_, _ = s.Write([]byte("partial"))
			s.reset()
		})
		s, err := open(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if got, err := io.ReadAll(s); err == nil {
			t.Fatalf("reset stream ended cleanly after %q, want an error", got)
		}
	})
}

func TestInteropClientReset(t *testing.T) {
	forEachPair(t, func(t *testing.T, ctx context.Context, e *env, p interopPair) {
		first := make(chan error, 1)
		after := make(chan error, 1)
		open := p.start(t, e, func(s *serverEnd) {
			if s.accept() != nil {
				return
			}
			buf := make([]byte, 5)
			_, err := io.ReadFull(s, buf)
			first <- err
			_, err = io.Copy(io.Discard, s)
			after <- err
		})
		s, err := open(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		if err := <-first; err != nil {
			t.Fatalf("server reading the first bytes: %v", err)
		}
		// Both directions are open: Close resets the stream.
		s.Close()
		select {
		case err := <-after:
			if err == nil {
				t.Fatal("server read a clean EOF from a reset stream, want an error")
			}
		case <-ctx.Done():
			t.Fatal("server never saw the client's reset")
		}
	})
}

func TestInteropRefusalStatuses(t *testing.T) {
	forEachPair(t, func(t *testing.T, ctx context.Context, e *env, p interopPair) {
		var handled atomic.Int32
		open := p.start(t, e, func(s *serverEnd) {
			handled.Add(1)
			var status int
			if _, err := fmt.Sscan(s.header.Get("X-Refuse"), &status); err == nil {
				s.refuse(status)
				return
			}
			echoApp(s)
		})
		for _, status := range []int{http.StatusBadRequest, http.StatusUnauthorized, http.StatusServiceUnavailable} {
			s, err := open(ctx, http.Header{"X-Refuse": {fmt.Sprint(status)}})
			if err == nil {
				s.Close()
				t.Fatalf("refused with %d: stream opened", status)
			}
			var ce *hbone.ConnectError
			if !errors.As(err, &ce) || ce.Status != status {
				t.Fatalf("refused with %d: %v, want ConnectError %d", status, err, status)
			}
		}
		// Refused streams leave the connection usable.
		s, err := open(ctx, nil)
		if err != nil {
			t.Fatalf("stream after refusals: %v", err)
		}
		defer s.Close()
		exchange(t, s, []byte("still fine"))
		if n := handled.Load(); n != 4 {
			t.Fatalf("server app ran %d times, want 4", n)
		}
	})
}
