//lint:file-ignore SA1019 x/net/http2 v0.62 deprecates its API in favour of net/http (where HTTP/2 moves in Go 1.27); the fuzzers build frames with its Framer, see docs/hbone.md.

package hbone_test

// Fuzz targets for what an HBONE endpoint accepts from an authenticated
// peer (issue 12, "Fuzz the frame and header handling"): arbitrary frames
// after the client preface into hbone.Server, arbitrary HPACK header blocks
// through CONNECT validation, and arbitrary frames from a server into
// hbone.Pool. Every input runs on a fresh mutual-TLS connection over an
// in-memory pipe, through the public API only. `make fuzz` runs them for
// FUZZTIME each; the seeds below run in every `go test`.

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/nodemesh/nodemesh/agent/hbone"
)

// fuzzLiveness bounds how long one input may keep a connection or a
// handler alive. It is a hang detector, not a performance threshold: every
// input ends in milliseconds unless something is stuck.
const fuzzLiveness = 30 * time.Second

// Ports of the fuzz server's handler, chosen by the CONNECT's :authority.
const (
	fuzzPortRefuse = 1 // refused with 401
	fuzzPortReset  = 2 // accepted, a few bytes, then RST_STREAM
	// any other valid port: accepted and echoed, at most fuzzEchoLimit bytes
	fuzzEchoLimit = 64 << 10
)

// frameBuf builds client or server frames for seeds.
type frameBuf struct {
	bytes.Buffer
	fr   *http2.Framer
	hbuf bytes.Buffer
	enc  *hpack.Encoder
}

func newFrameBuf() *frameBuf {
	fb := &frameBuf{}
	fb.fr = http2.NewFramer(&fb.Buffer, nil)
	fb.fr.AllowIllegalWrites = true
	fb.enc = hpack.NewEncoder(&fb.hbuf)
	return fb
}

// block HPACK-encodes name/value pairs with the buffer's encoder (so later
// blocks may refer to its dynamic table, as on a real connection).
func (fb *frameBuf) block(kv ...string) []byte {
	fb.hbuf.Reset()
	for i := 0; i+1 < len(kv); i += 2 {
		_ = fb.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return bytes.Clone(fb.hbuf.Bytes())
}

func (fb *frameBuf) headers(stream uint32, endStream bool, block []byte) *frameBuf {
	_ = fb.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: block, EndHeaders: true, EndStream: endStream})
	return fb
}

func (fb *frameBuf) connect(stream uint32, authority string, extra ...string) *frameBuf {
	return fb.headers(stream, false, fb.block(append([]string{":method", "CONNECT", ":authority", authority}, extra...)...))
}

func (fb *frameBuf) settings(s ...http2.Setting) *frameBuf {
	_ = fb.fr.WriteSettings(s...)
	return fb
}

func (fb *frameBuf) data(stream uint32, endStream bool, p string) *frameBuf {
	_ = fb.fr.WriteData(stream, endStream, []byte(p))
	return fb
}

// serverSeeds are client frame sequences (after the preface): valid
// CONNECTs, CONTINUATION, padding, oversized and malformed frames.
func serverSeeds() [][]byte {
	var seeds [][]byte
	add := func(fb *frameBuf) { seeds = append(seeds, bytes.Clone(fb.Bytes())) }

	add(newFrameBuf().settings().connect(1, target.String()).data(1, false, "hello").data(1, true, ""))
	add(newFrameBuf().settings().connect(1, "[fd00::1]:8080", "baggage", "k8s.namespace.name=default").data(1, true, "x"))
	add(newFrameBuf().settings().connect(1, "127.0.0.1:1"))
	add(newFrameBuf().settings().connect(1, "127.0.0.1:2").data(1, false, "after reset"))
	add(newFrameBuf().settings().connect(1, "pod.example:80"))
	add(newFrameBuf().settings().headers(1, true, newFrameBuf().block(":method", "GET", ":scheme", "https", ":path", "/", ":authority", "x")))
	// Several streams at once, one half-closed, one reset by the client.
	{
		fb := newFrameBuf().settings().connect(1, target.String()).connect(3, target.String()).connect(5, "127.0.0.1:1")
		fb.data(3, true, "three")
		_ = fb.fr.WriteRSTStream(1, http2.ErrCodeCancel)
		add(fb)
	}
	// CONNECT split over HEADERS and CONTINUATIONs.
	{
		fb := newFrameBuf().settings()
		blk := fb.block(":method", "CONNECT", ":authority", target.String(), "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
		_ = fb.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk[:3]})
		_ = fb.fr.WriteContinuation(1, false, blk[3:10])
		_ = fb.fr.WriteContinuation(1, true, blk[10:])
		fb.data(1, true, "continued")
		add(fb)
	}
	// A CONTINUATION flood that never ends the header block.
	{
		fb := newFrameBuf().settings()
		_ = fb.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: fb.block(":method", "CONNECT")})
		for range 64 {
			_ = fb.fr.WriteContinuation(1, false, fb.block("x-filler", strings.Repeat("a", 200)))
		}
		add(fb)
	}
	// Padded HEADERS and padded DATA.
	{
		fb := newFrameBuf().settings()
		_ = fb.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: fb.block(":method", "CONNECT", ":authority", target.String()), EndHeaders: true, PadLength: 200})
		_ = fb.fr.WriteDataPadded(1, false, []byte("padded"), make([]byte, 255))
		_ = fb.fr.WriteDataPadded(1, true, nil, make([]byte, 17))
		add(fb)
	}
	// A DATA frame larger than the server's SETTINGS_MAX_FRAME_SIZE, and
	// more data than the echo handler takes, in full-size frames.
	add(newFrameBuf().settings().connect(1, target.String()).data(1, false, strings.Repeat("z", hbone.DefaultMaxFrameSize+1)))
	{
		fb := newFrameBuf().settings().connect(1, target.String())
		chunk := strings.Repeat("w", 16384)
		for range fuzzEchoLimit/16384 + 2 {
			fb.data(1, false, chunk)
		}
		add(fb)
	}
	// Frame-size and stream-state errors.
	{
		fb := newFrameBuf().settings()
		_ = fb.fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 0, fb.block(":method", "CONNECT", ":authority", target.String()))
		add(fb)
	}
	add(newFrameBuf().settings().connect(2, target.String()))
	add(newFrameBuf().settings().connect(5, target.String()).connect(3, target.String()))
	add(newFrameBuf().settings().data(1, false, "data on an idle stream"))
	// Connection-level frames: PING, window updates (zero, overflowing),
	// PRIORITY, GOAWAY, an unknown type, a SETTINGS ACK out of turn.
	{
		fb := newFrameBuf().settings(
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0},
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: 16384},
			http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0},
			http2.Setting{ID: 0x99, Val: 7},
		)
		_ = fb.fr.WritePing(false, [8]byte{1, 2, 3, 4, 5, 6, 7, 8})
		_ = fb.fr.WriteWindowUpdate(0, 1<<31-1)
		_ = fb.fr.WriteWindowUpdate(0, 1<<31-1)
		_ = fb.fr.WritePriority(1, http2.PriorityParam{StreamDep: 1, Weight: 7})
		_ = fb.fr.WriteRawFrame(0xff, 0, 1, []byte("unknown frame type"))
		_ = fb.fr.WriteSettingsAck()
		fb.connect(1, target.String())
		_ = fb.fr.WriteWindowUpdate(1, 0)
		_ = fb.fr.WriteGoAway(0, http2.ErrCodeNo, []byte("bye"))
		add(fb)
	}
	// Malformed CONNECTs: :path/:scheme, extended CONNECT, duplicate
	// pseudo-headers, uppercase and connection-specific fields.
	for _, kv := range [][]string{
		{":method", "CONNECT", ":authority", target.String(), ":path", "/"},
		{":method", "CONNECT", ":authority", target.String(), ":protocol", "websocket", ":scheme", "https", ":path", "/"},
		{":method", "CONNECT", ":authority", target.String(), ":authority", "10.0.0.9:80"},
		{":method", "CONNECT", "x-before", "1", ":authority", target.String()},
		{":method", "CONNECT", ":authority", target.String(), "Upper", "x"},
		{":method", "CONNECT", ":authority", target.String(), "connection", "close"},
		{":method", "CONNECT", ":authority", target.String(), "te", "gzip"},
		{":method", "CONNECT", ":authority", target.String(), "x-nul", "a\x00b"},
		{":method", "CONNECT"},
	} {
		fb := newFrameBuf().settings()
		add(fb.headers(1, false, fb.block(kv...)))
	}
	// A HPACK dynamic-table size update and an invalid index.
	add(newFrameBuf().settings().headers(1, false, []byte{0x3f, 0xe1, 0x1f, 0x82, 0xbe}))
	return seeds
}

// fuzzEnv holds what every fuzz input shares: identities and TLS configs.
type fuzzEnv struct {
	e      *env
	client *tls.Config
}

func newFuzzEnv(f *testing.F) *fuzzEnv {
	e := newEnv(f)
	client, err := e.tls.ClientTLS(e.client, e.server)
	if err != nil {
		f.Fatal(err)
	}
	// x/net/http2 logs every connection error of the peer's making to the
	// standard logger; a fuzzer makes thousands.
	out := log.Writer()
	log.SetOutput(io.Discard)
	f.Cleanup(func() { log.SetOutput(out) })
	return &fuzzEnv{e: e, client: client}
}

// fuzzRun is the server side of one input: an hbone.Server of its own (so
// that a handler of an earlier input that starts late cannot be mistaken
// for one of this input) whose handler takes each path a real one may:
// refuse, accept and reset, accept and echo.
type fuzzRun struct {
	active atomic.Int64 // handlers running
	mu     sync.Mutex
	reqs   []*hbone.Request // every request that reached the handler
}

func (r *fuzzRun) ServeTunnel(_ context.Context, req *hbone.Request, tun *hbone.Tunnel) {
	r.active.Add(1)
	defer r.active.Add(-1)
	r.mu.Lock()
	r.reqs = append(r.reqs, req)
	r.mu.Unlock()
	switch req.Target.Port() {
	case fuzzPortRefuse:
		tun.Refuse(http.StatusUnauthorized)
	case fuzzPortReset:
		if tun.Accept() == nil {
			_, _ = tun.Write([]byte("partial"))
			tun.Reset()
		}
	default:
		if tun.Accept() == nil {
			_, _ = io.Copy(tun, io.LimitReader(tun, fuzzEchoLimit))
		}
	}
}

// run sends the client preface and then payload on a fresh authenticated
// connection to a fresh server, half-closes it, and checks that the server
// ends the connection and every handler, and that what the server sent
// stays within a small multiple of the input (no unbounded amplification).
// It returns the requests that reached the handler.
func (fe *fuzzEnv) run(t *testing.T, payload []byte) []*hbone.Request {
	run := &fuzzRun{}
	srv, err := hbone.NewServer(hbone.ServerConfig{Local: fe.e.server, TLS: fe.e.tls, Handler: run})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c1, c2 := net.Pipe()
	defer c1.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.ServeConn(ctx, c2)
	}()
	tc := tls.Client(c1, fe.client)
	_ = tc.SetDeadline(time.Now().Add(fuzzLiveness))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake with the HBONE server: %v", err)
	}
	received := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, tc)
		received <- n
	}()
	_, err = tc.Write([]byte(http2.ClientPreface))
	if err == nil {
		_, err = tc.Write(payload)
	}
	if err == nil {
		err = tc.CloseWrite() // close_notify: the peer sends nothing more
	}
	if isTimeout(err) {
		t.Fatalf("server stopped reading for %v", fuzzLiveness)
	}
	select {
	case <-served:
	case <-time.After(fuzzLiveness):
		t.Fatalf("server kept the connection %v after the peer's close_notify", fuzzLiveness)
	}
	n := <-received
	for deadline := time.Now().Add(fuzzLiveness); run.active.Load() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d handlers still running %v after their connection ended", run.active.Load(), fuzzLiveness)
		}
	}
	if limit := int64(64<<10 + 16*len(payload)); n > limit {
		t.Fatalf("server sent %d bytes for a %d-byte input (limit %d)", n, len(payload), limit)
	}
	run.mu.Lock()
	defer run.mu.Unlock()
	return run.reqs
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded)
}

// FuzzServerFrames feeds arbitrary bytes after a valid client preface into
// an authenticated HBONE server connection.
func FuzzServerFrames(f *testing.F) {
	for _, s := range serverSeeds() {
		f.Add(s)
	}
	fe := newFuzzEnv(f)
	f.Fuzz(func(t *testing.T, payload []byte) {
		fe.run(t, payload)
	})
}

// connectSeeds are HPACK blocks of CONNECT requests, valid and not.
func connectSeeds() [][]byte {
	var seeds [][]byte
	enc := func(kv ...string) {
		seeds = append(seeds, newFrameBuf().block(kv...))
	}
	enc(":method", "CONNECT", ":authority", target.String())
	enc(":method", "CONNECT", ":authority", "[fd00::5]:15008", "baggage", "k8s.namespace.name=default,k8s.pod.name=a", "forwarded", "for=10.0.0.1", "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
	enc(":method", "CONNECT", ":authority", "127.0.0.1:1")
	enc(":method", "CONNECT", ":authority", "10.0.0.1:080")
	enc(":method", "CONNECT", ":authority", "[::ffff:10.0.0.1]:80")
	enc(":method", "CONNECT", ":authority", "[fe80::1%eth0]:80")
	enc(":method", "CONNECT", ":authority", "pod.example:80")
	enc(":method", "CONNECT", ":authority", target.String(), ":path", "/")
	enc(":method", "CONNECT", ":authority", target.String(), "host", "10.9.9.9:80")
	enc(":method", "CONNECT", ":authority", target.String(), "cookie", "a=b", "cookie", "c=d")
	enc(":method", "connect", ":authority", target.String())
	enc(":method", "GET", ":scheme", "https", ":path", "/", ":authority", target.String())
	enc(":authority", target.String(), ":method", "CONNECT", "content-length", "5")
	// A dynamic-table size update in front of a valid block.
	seeds = append(seeds, append([]byte{0x20}, seeds[0]...))
	return seeds
}

// FuzzConnectHeaders sends an arbitrary HPACK header block as a CONNECT's
// HEADERS frame and checks what the server's validation lets through: a
// handler runs only for a well-formed CONNECT (RFC 9113 §8.5) to an IP
// authority that ParseAuthority accepts, and sees no pseudo-header,
// connection-specific or invalid field.
func FuzzConnectHeaders(f *testing.F) {
	for _, s := range connectSeeds() {
		f.Add(s, false)
		f.Add(s, true)
	}
	fe := newFuzzEnv(f)
	f.Fuzz(func(t *testing.T, block []byte, endStream bool) {
		fb := newFrameBuf().settings()
		_ = fb.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true, EndStream: endStream})
		got := fe.run(t, fb.Bytes())
		if len(got) > 1 {
			t.Fatalf("one HEADERS frame reached the handler %d times", len(got))
		}
		if len(got) == 1 {
			if err := checkAccepted(block, got[0]); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// checkAccepted decodes block independently and returns why a request the
// server handed to its handler should have been refused.
func checkAccepted(block []byte, req *hbone.Request) error {
	fields, err := hpack.NewDecoder(4096, nil).DecodeFull(block)
	if err != nil {
		return fmt.Errorf("handler ran for a header block that does not decode: %w", err)
	}
	var method, authority []string
	regular := map[string]bool{}
	sawRegular := false
	for _, hf := range fields {
		if strings.HasPrefix(hf.Name, ":") {
			if sawRegular {
				return fmt.Errorf("handler ran for a block with pseudo-header %q after a regular field", hf.Name)
			}
			switch hf.Name {
			case ":method":
				method = append(method, hf.Value)
			case ":authority":
				authority = append(authority, hf.Value)
			default:
				return fmt.Errorf("handler ran for a CONNECT with pseudo-header %q", hf.Name)
			}
			continue
		}
		sawRegular = true
		if hf.Name != strings.ToLower(hf.Name) {
			return fmt.Errorf("handler ran for a block with the uppercase field name %q", hf.Name)
		}
		regular[hf.Name] = true
	}
	if len(method) != 1 || method[0] != http.MethodConnect {
		return fmt.Errorf("handler ran for :method %q", method)
	}
	if len(authority) != 1 {
		return fmt.Errorf("handler ran for :authority %q", authority)
	}
	want, err := hbone.ParseAuthority(authority[0])
	if err != nil {
		return fmt.Errorf("handler ran for an authority ParseAuthority refuses: %w", err)
	}
	if req.Target != want {
		return fmt.Errorf("handler saw target %s for :authority %q", req.Target, authority[0])
	}
	for name, values := range req.Header {
		lower := strings.ToLower(name)
		switch {
		case strings.HasPrefix(name, ":"):
			return fmt.Errorf("handler saw pseudo-header %q among the headers", name)
		case !httpguts.ValidHeaderFieldName(name):
			return fmt.Errorf("handler saw invalid field name %q", name)
		case !regular[lower]:
			return fmt.Errorf("handler saw field %q that the block does not carry", name)
		case lower == "connection" || lower == "keep-alive" || lower == "proxy-connection" || lower == "transfer-encoding" || lower == "upgrade":
			return fmt.Errorf("handler saw connection-specific field %q (RFC 9113 §8.2.2)", name)
		}
		for _, v := range values {
			if !httpguts.ValidHeaderFieldValue(v) {
				return fmt.Errorf("handler saw field %q with invalid value %q", name, v)
			}
			if lower == "te" && v != "trailers" {
				return fmt.Errorf("handler saw te: %q (RFC 9113 §8.2.2 allows only trailers)", v)
			}
		}
	}
	return nil
}

// poolSeeds are server frame sequences answering the pool's first CONNECT
// (stream 1).
func poolSeeds() [][]byte {
	var seeds [][]byte
	add := func(fb *frameBuf) { seeds = append(seeds, bytes.Clone(fb.Bytes())) }
	status := func(fb *frameBuf, code string, endStream bool) *frameBuf {
		return fb.headers(1, endStream, fb.block(":status", code))
	}
	{
		fb := newFrameBuf().settings()
		_ = fb.fr.WriteSettingsAck()
		add(status(fb, "200", false).data(1, false, "hello").data(1, true, ""))
	}
	add(status(newFrameBuf().settings(), "503", true))
	add(status(newFrameBuf().settings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0}), "200", false))
	{
		fb := status(newFrameBuf().settings(), "200", false).data(1, false, "partial")
		_ = fb.fr.WriteRSTStream(1, http2.ErrCodeInternal)
		add(fb)
	}
	{
		fb := newFrameBuf().settings()
		_ = fb.fr.WriteGoAway(0, http2.ErrCodeNo, nil)
		add(fb)
	}
	{
		fb := newFrameBuf().settings()
		blk := fb.block(":status", "200", "x-long", strings.Repeat("v", 300))
		_ = fb.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk[:5]})
		_ = fb.fr.WriteContinuation(1, true, blk[5:])
		_ = fb.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: fb.block(":method", "GET"), EndHeaders: true})
		_ = fb.fr.WriteDataPadded(1, true, []byte("padded"), make([]byte, 9))
		add(fb)
	}
	{
		fb := status(newFrameBuf().settings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31}), "200", false)
		_ = fb.fr.WriteWindowUpdate(1, 1<<31-1)
		_ = fb.fr.WriteWindowUpdate(1, 1<<31-1)
		_ = fb.fr.WritePing(false, [8]byte{})
		fb.data(3, false, "unknown stream").data(1, false, strings.Repeat("y", 70000))
		add(fb)
	}
	add(status(newFrameBuf().settings(), "1xx", false))
	add(newFrameBuf().headers(1, false, newFrameBuf().block(":status", "200"))) // no SETTINGS first
	return seeds
}

// FuzzPoolFrames answers the pool's first CONNECT with arbitrary bytes from
// an authenticated server and checks that Connect, reading the stream and
// closing the pool all return.
func FuzzPoolFrames(f *testing.F) {
	for _, s := range poolSeeds() {
		f.Add(s)
	}
	e := newFuzzEnv(f).e
	srvCfg, err := e.tls.ServerTLS(e.server)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		var wg sync.WaitGroup
		defer wg.Wait()
		dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
			c1, c2 := net.Pipe()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c2.Close()
				sc := tls.Server(c2, srvCfg)
				_ = sc.SetDeadline(time.Now().Add(fuzzLiveness))
				if sc.Handshake() != nil {
					return
				}
				// Drain what the client sends while the payload goes out,
				// then end the connection.
				drained := make(chan struct{})
				go func() {
					defer close(drained)
					_, _ = io.Copy(io.Discard, sc)
				}()
				_, _ = sc.Write(payload)
				_ = sc.CloseWrite()
				<-drained
			}()
			return c1, nil
		}
		p, err := hbone.NewPool(hbone.PoolConfig{TLS: e.tls, Dial: dial})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		ctx, cancel := context.WithTimeout(context.Background(), fuzzLiveness)
		defer cancel()
		s, err := p.Connect(ctx, hbone.ConnectRequest{Key: hbone.Key{Src: e.client, Dst: e.server, Addr: target}, Target: target})
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(s, 1<<20))
			s.Close()
		}
		if ctx.Err() != nil {
			t.Fatalf("Connect or the stream hung for %v on a server that closed its connection", fuzzLiveness)
		}
	})
}
