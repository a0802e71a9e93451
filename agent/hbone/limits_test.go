package hbone_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// rawConn is an authenticated TLS connection with the HTTP/2 preface sent,
// for tests that write frames the pool never would.
type rawConn struct {
	tc *tls.Conn
	fr *http2.Framer
}

func dialRaw(t *testing.T, e *env, addr netip.AddrPort) *rawConn {
	t.Helper()
	cfg, err := e.tls.ClientTLS(e.client, e.server)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := tls.Dial("tcp", addr.String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	tc.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(tc, tc)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return &rawConn{tc: tc, fr: fr}
}

// goAwayCode reads frames until GOAWAY and returns its code.
func (r *rawConn) goAwayCode(t *testing.T) http2.ErrCode {
	t.Helper()
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("connection ended without GOAWAY: %v", err)
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			return ga.ErrCode
		}
	}
}

func connectBlock(t *testing.T, extra ...hpack.HeaderField) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: target.String()})
	for _, f := range extra {
		enc.WriteField(f)
	}
	return buf.Bytes()
}

func TestHeaderBlockLimit(t *testing.T) {
	e := newEnv(t)
	srv, addr := e.startServer(t, echo, nil)
	r := dialRaw(t, e, addr)
	big := connectBlock(t, hpack.HeaderField{Name: "baggage", Value: strings.Repeat("x", 20000)})
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: big[:16000], EndHeaders: false}); err != nil {
		t.Fatal(err)
	}
	r.fr.WriteContinuation(1, true, big[16000:])
	if code := r.goAwayCode(t); code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM", code)
	}
	if st := srv.Stats(); st.HeaderTooLarge != 1 || st.Streams != 0 {
		t.Fatalf("%+v: want 1 header-too-large, no stream", st)
	}
}

func TestContinuationFloodLimit(t *testing.T) {
	e := newEnv(t)
	srv, addr := e.startServer(t, echo, nil)
	r := dialRaw(t, e, addr)
	block := connectBlock(t)
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:1], EndHeaders: false})
	for range 100 {
		if r.fr.WriteContinuation(1, false, nil) != nil {
			break
		}
	}
	if code := r.goAwayCode(t); code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM", code)
	}
	if st := srv.Stats(); st.HeaderTooLarge != 1 {
		t.Fatalf("%+v: want the CONTINUATION flood counted", st)
	}
}

func TestPingFloodLimit(t *testing.T) {
	e := newEnv(t)
	srv, addr := e.startServer(t, echo, nil)
	r := dialRaw(t, e, addr)
	go func() {
		for range 5000 {
			if r.fr.WritePing(false, [8]byte{}) != nil {
				return
			}
		}
	}()
	if code := r.goAwayCode(t); code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM", code)
	}
	if st := srv.Stats(); st.Floods != 1 {
		t.Fatalf("%+v: want 1 flood", st)
	}
}

func TestPerPeerConnectionLimit(t *testing.T) {
	e := newEnv(t)
	srv, addr := e.startServer(t, echo, func(c *hbone.ServerConfig) { c.MaxConnsPerPeer = 2 })
	for range 2 {
		c, err := net.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	waitfor.True(t, 30*time.Second, "two handshakes in flight", func() bool { return srv.Stats().HandshakesInFlight == 2 })
	// The reset can come so fast that the dial itself reports it.
	if c, err := net.Dial("tcp", addr.String()); err == nil {
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("third connection from one peer: read %v, want closed", err)
		}
	}
	waitfor.True(t, 30*time.Second, "the refusal counted", func() bool { return srv.Stats().PeerConnLimit == 1 })
	if st := srv.Stats(); st.PeerConnLimit != 1 {
		t.Fatalf("%+v: want 1 per-peer refusal", st)
	}
}

func TestResponseHeaderTimeout(t *testing.T) {
	e := newEnv(t)
	// The handler never answers until the client gives up (its reset
	// cancels the handler's context).
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		<-ctx.Done()
		tun.Refuse(http.StatusServiceUnavailable)
	})
	_, addr := e.startServer(t, h, nil)
	p := e.newPool(t, func(c *hbone.PoolConfig) { c.ResponseHeaderTimeout = 200 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := p.Connect(ctx, hbone.ConnectRequest{Key: e.key(addr), Target: target}); err == nil {
		t.Fatal("Connect without a response succeeded")
	}
	if st := p.Stats(); st.ResponseTimeouts != 1 || st.Streams != 0 {
		t.Fatalf("%+v: want 1 response timeout, no stream", st)
	}
}

// TestRapidResetKeepsHandlerSlots opens streams up to the limit, resets
// them at once, and opens more: a reset stream keeps its slot until its
// handler returns, so the new ones are refused instead of piling up
// handlers (the HTTP/2 rapid-reset attack).
func TestRapidResetKeepsHandlerSlots(t *testing.T) {
	e := newEnv(t)
	release := make(chan struct{})
	var running atomic.Int32
	h := handlerFunc(func(ctx context.Context, req *hbone.Request, tun *hbone.Tunnel) {
		running.Add(1)
		defer running.Add(-1)
		<-release // ignores the reset, like a handler busy dialling
		tun.Refuse(http.StatusServiceUnavailable)
	})
	srv, addr := e.startServer(t, h, func(c *hbone.ServerConfig) { c.MaxStreams = 2 })
	defer close(release)
	r := dialRaw(t, e, addr)
	block := connectBlock(t)
	for id := uint32(1); id <= 3; id += 2 {
		r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true})
		r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
	}
	waitfor.True(t, 30*time.Second, "two handlers", func() bool { return running.Load() == 2 })
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: block, EndHeaders: true})
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if rst, ok := f.(*http2.RSTStreamFrame); ok && rst.StreamID == 5 {
			if rst.ErrCode != http2.ErrCodeRefusedStream {
				t.Fatalf("third stream reset with %v, want REFUSED_STREAM", rst.ErrCode)
			}
			break
		}
	}
	if st := srv.Stats(); st.StreamLimit != 1 || st.Streams != 2 || running.Load() != 2 {
		t.Fatalf("%+v, %d handlers running: want 1 refused stream, 2 handlers", st, running.Load())
	}
}

// TestLateFramesOnResetStream sends trailers and DATA on a stream the
// server has just reset: RFC 9113 §5.1 says to ignore them, so the
// connection must stay up and serve the next stream.
func TestLateFramesOnResetStream(t *testing.T) {
	e := newEnv(t)
	_, addr := e.startServer(t, echo, nil)
	r := dialRaw(t, e, addr)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var bad bytes.Buffer // a CONNECT without :authority: reset at once
	hpack.NewEncoder(&bad).WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: bad.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("waiting for the reset of stream 1: %v", err)
		}
		if rst, ok := f.(*http2.RSTStreamFrame); ok && rst.StreamID == 1 {
			break
		}
	}
	var trailers bytes.Buffer
	hpack.NewEncoder(&trailers).WriteField(hpack.HeaderField{Name: "x-late", Value: "1"})
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: trailers.Bytes(), EndHeaders: true, EndStream: true}); err != nil {
		t.Fatal(err)
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: connectBlock(t), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("waiting for the answer on stream 3: %v", err)
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v after trailers on a reset stream, want them ignored", f.ErrCode)
		case *http2.MetaHeadersFrame:
			if f.StreamID == 3 {
				if st := f.PseudoValue("status"); st != "200" {
					t.Fatalf("stream 3 answered %s, want 200", st)
				}
				return
			}
		}
	}
}
