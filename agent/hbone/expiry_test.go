package hbone_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// shortLived replaces id's SVID with one that expires in 3 to 4 s (X.509
// keeps whole seconds) and returns its NotAfter. The margin is for the
// handshake and the first streams, which must happen before it; a
// loopback handshake takes milliseconds.
func (e *env) shortLived(t *testing.T, id spiffeid.ID) time.Time {
	t.Helper()
	at := time.Now().Add(4 * time.Second).Truncate(time.Second)
	svid, err := e.ca.SVIDUntil(id, at)
	if err != nil {
		t.Fatal(err)
	}
	e.store.Add(svid)
	return at
}

// renew gives id a fresh SVID, as the agent's SVID manager does at half
// life.
func (e *env) renew(t *testing.T, id spiffeid.ID) {
	t.Helper()
	svid, err := e.ca.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	e.store.Add(svid)
}

// echoOnce writes msg on s and reads the echo, leaving the stream open.
func echoOnce(t *testing.T, s io.ReadWriter, msg string) {
	t.Helper()
	if _, err := s.Write([]byte(msg)); err != nil {
		t.Fatalf("writing %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(s, buf); err != nil {
		t.Fatalf("reading the echo of %q: %v", msg, err)
	}
	if string(buf) != msg {
		t.Fatalf("echo %q, want %q", buf, msg)
	}
}

// TestPoolDrainsAtPeerCertExpiry: a pooled connection takes no new stream
// once the peer's certificate has expired, though TLS checked it only at
// the handshake. The next stream opens a new connection (which verifies
// the peer's renewed SVID), the stream already open keeps working, and
// the old connection closes when it ends (issue 14: pooled tunnels
// outlived the peer's SVID). Before the fix the new stream went on the old
// connection: one handshake, not two.
func TestPoolDrainsAtPeerCertExpiry(t *testing.T) {
	e := newEnv(t)
	expiry := e.shortLived(t, e.server)
	srv, addr := e.startServer(t, echo, nil)
	p := e.newPool(t, nil)
	key := e.key(addr)
	old := connect(t, p, key)
	echoOnce(t, old, "before")
	second := connect(t, p, key)
	echoOnce(t, second, "pooled")
	second.Close()
	if st := p.Stats(); st.Handshakes != 1 || st.ExpiredConns != 0 {
		t.Fatalf("before expiry: %+v, want both streams on one connection", st)
	}
	if !time.Now().Before(expiry) {
		t.Fatalf("setting up took past the server certificate's expiry (%s): the test proves nothing", expiry)
	}
	e.renew(t, e.server)
	waitfor.True(t, 30*time.Second, "the pool to drain the connection at the peer's expiry", func() bool {
		return p.Stats().ExpiredConns == 1
	})
	if now := time.Now(); now.Before(expiry) {
		t.Fatalf("drained at %s, before the certificate expired (%s)", now, expiry)
	}
	after := connect(t, p, key)
	echoOnce(t, after, "after")
	if st := p.Stats(); st.Handshakes != 2 {
		t.Fatalf("after expiry: %+v, want the new stream on a new connection (2 handshakes)", st)
	}
	// The stream opened before expiry is not cut.
	echoOnce(t, old, "still open")
	old.Close()
	waitfor.True(t, 30*time.Second, "the expired connection to close after its last stream", func() bool {
		return srv.Stats().Conns == 1
	})
	// The server saw its own certificate expire too.
	if st := srv.Stats(); st.ExpiredConns != 1 {
		t.Errorf("server: %+v, want 1 connection drained at expiry", st)
	}
	after.Close()
}

// TestPoolFailsClosedAtOwnCertExpiry: the pool's own SVID expires and is
// not renewed (the CA is down): the stream already open keeps working,
// but no new stream goes on the connection opened with that SVID, and a
// new connection is refused (the pool does not use a handshake that
// presented an expired certificate; the server refuses it too). Before the
// fix the new stream succeeded on the pooled connection.
func TestPoolFailsClosedAtOwnCertExpiry(t *testing.T) {
	e := newEnv(t)
	expiry := e.shortLived(t, e.client)
	_, addr := e.startServer(t, echo, nil)
	p := e.newPool(t, nil)
	key := e.key(addr)
	old := connect(t, p, key)
	echoOnce(t, old, "before")
	if !time.Now().Before(expiry) {
		t.Fatalf("setting up took past the client certificate's expiry (%s): the test proves nothing", expiry)
	}
	waitfor.True(t, 30*time.Second, "the pool to drain the connection at its own certificate's expiry", func() bool {
		return p.Stats().ExpiredConns == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if s, err := p.Connect(ctx, hbone.ConnectRequest{Key: key, Target: target}); err == nil {
		s.Close()
		t.Fatalf("a new stream after the pool's own SVID expired succeeded (%+v)", p.Stats())
	} else {
		t.Logf("new stream after expiry: %v", err)
	}
	if st := p.Stats(); st.ExpiredConns != 1 || st.HandshakeErrors == 0 {
		t.Errorf("%+v: want the one connection drained, and the new one refused", st)
	}
	echoOnce(t, old, "still open")
	old.Close()
}

// TestServerRefusesStreamsAfterClientCertExpiry: a client that is not our
// pool (it keeps opening streams on its connection) gets GOAWAY when its
// certificate expires, and a CONNECT after that is refused with
// REFUSED_STREAM, never handed to the handler; the stream opened before
// expiry keeps working.
func TestServerRefusesStreamsAfterClientCertExpiry(t *testing.T) {
	e := newEnv(t)
	expiry := e.shortLived(t, e.client)
	srv, addr := e.startServer(t, echo, nil)
	cfg, err := e.tls.ClientTLS(e.client, e.server)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.Dial("tcp", addr.String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fr := http2.NewFramer(c, c)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var hbuf bytes.Buffer
	enc := hpack.NewEncoder(&hbuf)
	dec := hpack.NewDecoder(4096, nil)
	connectOn := func(id uint32) {
		t.Helper()
		hbuf.Reset()
		enc.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect})
		enc.WriteField(hpack.HeaderField{Name: ":authority", Value: target.String()})
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hbuf.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	// next reads frames, acknowledging SETTINGS, until want returns true.
	next := func(what string, want func(http2.Frame) bool) {
		t.Helper()
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				t.Fatalf("waiting for %s: %v", what, err)
			}
			if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
				if err := fr.WriteSettingsAck(); err != nil {
					t.Fatal(err)
				}
			}
			if want(f) {
				return
			}
		}
	}
	dataOn := func(id uint32, msg string) func(http2.Frame) bool {
		var got []byte
		return func(f http2.Frame) bool {
			if d, ok := f.(*http2.DataFrame); ok && d.StreamID == id {
				got = append(got, d.Data()...)
			}
			return string(got) == msg
		}
	}
	connectOn(1)
	next("the answer to CONNECT 1", func(f http2.Frame) bool {
		h, ok := f.(*http2.HeadersFrame)
		if !ok || h.StreamID != 1 {
			return false
		}
		fields, err := dec.DecodeFull(h.HeaderBlockFragment())
		if err != nil || len(fields) == 0 || fields[0].Value != "200" {
			t.Fatalf("CONNECT 1 answered %v (%v)", fields, err)
		}
		return true
	})
	if err := fr.WriteData(1, false, []byte("before")); err != nil {
		t.Fatal(err)
	}
	next("the echo on stream 1", dataOn(1, "before"))
	if !time.Now().Before(expiry) {
		t.Fatalf("setting up took past the client certificate's expiry (%s): the test proves nothing", expiry)
	}
	next("GOAWAY at the client certificate's expiry", func(f http2.Frame) bool {
		g, ok := f.(*http2.GoAwayFrame)
		if !ok {
			return false
		}
		if g.ErrCode != http2.ErrCodeNo || g.LastStreamID != 1 {
			t.Fatalf("GOAWAY %v, last stream %d; want NO_ERROR, 1", g.ErrCode, g.LastStreamID)
		}
		return true
	})
	if now := time.Now(); now.Before(expiry) {
		t.Fatalf("GOAWAY at %s, before the certificate expired (%s)", now, expiry)
	}
	connectOn(3)
	next("REFUSED_STREAM for a CONNECT after expiry", func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			if f.StreamID == 3 {
				if f.ErrCode != http2.ErrCodeRefusedStream {
					t.Fatalf("stream 3 reset with %v, want REFUSED_STREAM", f.ErrCode)
				}
				return true
			}
		case *http2.HeadersFrame:
			if f.StreamID == 3 {
				t.Fatal("the server answered a CONNECT after the client's certificate expired")
			}
		}
		return false
	})
	if err := fr.WriteData(1, false, []byte("after")); err != nil {
		t.Fatal(err)
	}
	next("the echo on stream 1 after expiry", dataOn(1, "after"))
	if st := srv.Stats(); st.ExpiredConns != 1 || st.Streams != 1 {
		t.Errorf("server: %+v, want 1 connection drained at expiry, still carrying its stream", st)
	}
}
