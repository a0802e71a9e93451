package mesh

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

// testOutbound is an outbound whose mirrors are sent by send.
func testOutbound(t *testing.T, cfg Config, send func(ctx context.Context, up *upstream, c *mirrorCopy, body []byte) error) (*outbound, *Layer) {
	t.Helper()
	cfg.State = func() *state.Snapshot { return nil }
	cfg.Authorize = denyAll
	l, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	out := &outbound{l: l, o: &proxy.L7Outbound{Ctx: context.Background()}, log: slog.New(slog.DiscardHandler), mirrorSend: send}
	return out, l
}

var shadow = &route.Mirror{Backend: &route.Backend{Service: route.ServiceKey{Namespace: "shop", Name: "shadow"}, Port: 80}, Num: 1, Den: 1}

// A mirror that never answers costs the client nothing and pins nothing:
// copies beyond MaxMirrors are dropped, each copy gets MirrorTimeout as its
// deadline, and closing the client's connection waits for them. Nothing
// here depends on the machine's speed: the mirrors hold until the test
// releases them, so a client that waited for one would never finish.
func TestMirrorBounded(t *testing.T) {
	const slots, timeout = 4, time.Hour
	var (
		mu        sync.Mutex
		started   int
		deadlines []time.Duration
		release   = make(chan struct{})
	)
	out, l := testOutbound(t, Config{MaxMirrors: slots, MirrorTimeout: timeout}, func(ctx context.Context, _ *upstream, _ *mirrorCopy, _ []byte) error {
		dl, ok := ctx.Deadline()
		mu.Lock()
		started++
		if ok {
			deadlines = append(deadlines, time.Until(dl))
		}
		mu.Unlock()
		select { // a dead mirror, until released
		case <-ctx.Done():
			return ctx.Err()
		case <-release:
			return nil
		}
	})
	// A client that waited for a mirror would hang here: after a minute
	// the watchdog releases the mirrors and fails the test.
	var stuck atomic.Bool
	watchdog := time.AfterFunc(time.Minute, func() {
		stuck.Store(true)
		close(release)
	})
	goroutines := runtime.NumGoroutine()
	for range 1000 {
		r := httptest.NewRequest("GET", "/x", nil)
		out.mirror(r, out.sampleMirrors(r, []*route.Mirror{shadow}, nil))
	}
	if !watchdog.Stop() || stuck.Load() {
		t.Fatal("1000 requests did not hand their copies over while the mirrors hung: the client waits for the mirror")
	}
	if n := runtime.NumGoroutine() - goroutines; n > slots {
		t.Errorf("%d goroutines for mirrors, want at most %d", n, slots)
	}
	if got := l.mirrorsDropped.Load(); got != 1000-slots {
		t.Errorf("%d copies dropped, want %d", got, 1000-slots)
	}
	mu.Lock()
	if started != slots || len(deadlines) != slots {
		t.Errorf("%d copies sent (%d with a deadline), want %d", started, len(deadlines), slots)
	}
	for _, d := range deadlines {
		if d > timeout || d < timeout-10*time.Minute {
			t.Errorf("a copy's deadline is %s away, want the mirror timeout %s", d, timeout)
		}
	}
	mu.Unlock()
	closed := make(chan struct{})
	go func() { out.closeMirrors(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("closing did not wait for the copies in flight")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	<-closed
	if n := len(l.mirrorSlots); n != 0 {
		t.Errorf("%d mirror slots still taken", n)
	}
	// After the connection ended, late copies (a body finishing on the
	// transport's goroutine) are dropped, not started.
	r := httptest.NewRequest("GET", "/late", nil)
	out.mirror(r, out.sampleMirrors(r, []*route.Mirror{shadow}, nil))
	if n := len(l.mirrorSlots); n != 0 {
		t.Errorf("a copy started after the connection ended")
	}
}

// A copy that never answers ends at MirrorTimeout, and closing the
// client's connection waits for that and no longer.
func TestMirrorTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	ended := make(chan error, 1)
	out, _ := testOutbound(t, Config{MirrorTimeout: timeout}, func(ctx context.Context, _ *upstream, _ *mirrorCopy, _ []byte) error {
		<-ctx.Done() // a dead mirror
		ended <- ctx.Err()
		return ctx.Err()
	})
	begin := time.Now()
	r := httptest.NewRequest("GET", "/x", nil)
	out.mirror(r, out.sampleMirrors(r, []*route.Mirror{shadow}, nil))
	out.closeMirrors()
	if d := time.Since(begin); d < timeout {
		t.Errorf("closing returned after %s, before the copy's timeout %s", d, timeout)
	}
	select {
	case err := <-ended:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("the copy ended with %v, want its deadline", err)
		}
	default:
		t.Error("closing returned before the copy in flight ended")
	}
}

// A copy carries the request as filtered (method, URI, Host, headers
// without hop-by-hop ones) and the whole body, sent only once the primary
// request has read the body; bodies over the limit, unfinished bodies and
// upgrades are not mirrored.
func TestMirrorCopy(t *testing.T) {
	type sent struct {
		c    *mirrorCopy
		body []byte
	}
	got := make(chan sent, 10)
	out, l := testOutbound(t, Config{}, func(_ context.Context, _ *upstream, c *mirrorCopy, body []byte) error {
		got <- sent{c, body}
		return nil
	})
	defer out.closeMirrors()

	r := httptest.NewRequest("POST", "/api/items?x=1", strings.NewReader("hello"))
	r.Host = "reviews"
	r.Header.Set("Connection", "keep-alive, X-Hop")
	r.Header.Set("X-Hop", "1")
	r.Header.Set("Keep-Alive", "timeout=5")
	r.Header.Set("X-Keep", "yes")
	r.Header.Set("Te", "trailers")
	out.mirror(r, out.sampleMirrors(r, []*route.Mirror{shadow}, nil))
	select {
	case s := <-got:
		t.Fatalf("copy sent before the body was read: %+v", s.c)
	case <-time.After(50 * time.Millisecond):
	}
	if b, err := io.ReadAll(r.Body); err != nil || string(b) != "hello" {
		t.Fatalf("the primary read %q, %v", b, err)
	}
	s := <-got
	if s.c.method != "POST" || s.c.url.RequestURI() != "/api/items?x=1" || s.c.host != "reviews" || string(s.body) != "hello" {
		t.Errorf("copy: %s %s Host %s body %q", s.c.method, s.c.url.RequestURI(), s.c.host, s.body)
	}
	for _, h := range []string{"Connection", "X-Hop", "Keep-Alive"} {
		if _, ok := s.c.header[h]; ok {
			t.Errorf("the copy carries hop-by-hop header %s", h)
		}
	}
	if s.c.header.Get("X-Keep") != "yes" || s.c.header.Get("Te") != "trailers" {
		t.Errorf("the copy lost end-to-end headers: %v", s.c.header)
	}
	r.Body.Close()

	dropped := l.mirrorsDropped.Load()
	// Larger than a mirror copies: the primary gets all of it, no copy.
	big := bytes.Repeat([]byte("x"), maxMirrorBody+1)
	r = httptest.NewRequest("POST", "/big", bytes.NewReader(big))
	out.mirror(r, out.sampleMirrors(r, []*route.Mirror{shadow}, nil))
	if b, _ := io.ReadAll(r.Body); len(b) != len(big) {
		t.Errorf("the primary read %d bytes of %d", len(b), len(big))
	}
	r.Body.Close()
	// Closed before its end (the backend answered early).
	r = httptest.NewRequest("POST", "/unfinished", strings.NewReader("abcdef"))
	out.mirror(r, out.sampleMirrors(r, []*route.Mirror{shadow}, nil))
	_, _ = r.Body.Read(make([]byte, 2))
	r.Body.Close()
	// An upgrade is never copied.
	r = httptest.NewRequest("GET", "/ws", nil)
	r.Header.Set("Upgrade", "websocket")
	if cs := out.sampleMirrors(r, []*route.Mirror{shadow}, nil); len(cs) != 0 {
		t.Errorf("an upgrade was mirrored")
	}
	// No body: sent at once.
	r = httptest.NewRequest("GET", "/nobody", nil)
	out.mirror(r, out.sampleMirrors(r, []*route.Mirror{shadow}, nil))
	if s := <-got; s.c.url.Path != "/nobody" || s.body != nil {
		t.Errorf("copy of a request without a body: %s %q", s.c.url.Path, s.body)
	}
	select {
	case s := <-got:
		t.Errorf("unexpected copy of %s", s.c.url.Path)
	case <-time.After(50 * time.Millisecond):
	}
	if d := l.mirrorsDropped.Load() - dropped; d != 2 {
		t.Errorf("%d copies dropped, want 2 (too large, unfinished)", d)
	}
}

// teeBody reports exactly once, whatever the order of reads and closes.
func TestTeeBody(t *testing.T) {
	for _, tc := range []struct {
		name    string
		body    string
		limit   int
		read    int // bytes to read before Close; -1 all
		want    string
		wantErr error
	}{
		{"whole", "0123456789", 16, -1, "0123456789", nil},
		{"exactly the limit", "0123456789", 10, -1, "0123456789", nil},
		{"over the limit", "0123456789", 9, -1, "", errMirrorBody},
		{"closed early", "0123456789", 16, 3, "", errBodyUnfinished},
		{"empty", "", 16, -1, "", nil},
	} {
		calls := 0
		var got []byte
		var gotErr error
		tb := &teeBody{ReadCloser: io.NopCloser(strings.NewReader(tc.body)), limit: tc.limit, done: func(b []byte, err error) {
			calls++
			got, gotErr = b, err
		}}
		if tc.read < 0 {
			if _, err := io.ReadAll(tb); err != nil {
				t.Fatal(err)
			}
		} else {
			_, _ = io.ReadFull(tb, make([]byte, tc.read))
		}
		tb.Close()
		tb.Close()
		if calls != 1 || string(got) != tc.want || !errors.Is(gotErr, tc.wantErr) {
			t.Errorf("%s: %d calls, %q, %v; want 1, %q, %v", tc.name, calls, got, gotErr, tc.want, tc.wantErr)
		}
	}
}
