package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// These tests drive the race behind a connection that closes right after
// the peer's END_STREAM, deterministically: the connection's close comes
// after the peer's last DATA and before our own END_STREAM is recorded as
// sent. They build a conn without goroutines and call its methods in the
// order the race produces.

// closeTestConn returns a client conn (no goroutines started) over a
// loopback socket, and one open stream on it that got its 200.
func closeTestConn(t *testing.T) (*conn, *stream) {
	t.Helper()
	a, _ := tcpPair(t)
	flow, err := FlowControl{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	cfg := &connConfig{flow: flow, maxHeaderBytes: 16 << 10, log: slog.New(slog.DiscardHandler), ctr: &counters{}}
	bc := newBatchConn(a)
	c := newConn(context.Background(), tls.Client(bc, &tls.Config{}), bc, cfg, spiffeid.ID{}, netip.AddrPort{})
	s := newStream(c, 1)
	s.status = 200
	c.mu.Lock()
	c.streams[s.id] = s
	c.mu.Unlock()
	return c, s
}

// endSendUnrecorded puts s where closeSend is between writing END_STREAM
// and recording it: the sending side is closed, sentEnd is not yet set.
func endSendUnrecorded(s *stream) {
	s.c.mu.Lock()
	s.sendErr = errSendClosed
	s.c.mu.Unlock()
}

func TestConnCloseKeepsReceivedDataForReader(t *testing.T) {
	c, s := closeTestConn(t)
	s.onData([]byte("the whole answer"), len("the whole answer"), true)
	endSendUnrecorded(s)
	c.fail(errors.New("peer closed the connection"))
	c.wait()

	got, err := io.ReadAll(readerFunc(s.read))
	if err != nil || string(got) != "the whole answer" {
		t.Fatalf("reading after the close: %q, %v; want the whole answer and EOF", got, err)
	}
	if err := s.closeSend(); err == nil {
		t.Fatal("sending after the connection closed succeeded")
	}
}

// relayTestSink attaches an application socket whose buffers are small,
// so that most of what the stream receives waits for a drainer.
func relayTestSink(t *testing.T, s *stream) (app *net.TCPConn) {
	t.Helper()
	mine, app := tcpPair(t)
	if err := mine.SetWriteBuffer(64 << 10); err != nil {
		t.Fatal(err)
	}
	if err := app.SetReadBuffer(64 << 10); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.sink = newSink(mine, new(atomic.Int64))
	s.mu.Unlock()
	return app
}

func TestConnCloseLetsDrainerFinishRelayedStream(t *testing.T) {
	c, s := closeTestConn(t)
	app := relayTestSink(t, s)
	want := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	s.onData(want, len(want), true)                          // most of it waits for the drainer
	endSendUnrecorded(s)                                     // the application had finished sending
	c.fail(errors.New("peer closed the connection"))

	// The drainer is blocked on the application's full socket. Reading
	// it must give every byte and then the FIN, not a truncated stream.
	if err := app.SetReadDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(app)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("application read %d of %d bytes, then %v; want all of them and EOF", len(got), len(want), err)
	}
	c.wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil || !s.recvDoneLocked() {
		t.Fatalf("stream after the drain: err %v, receive done %v; want a clean end", s.err, s.recvDoneLocked())
	}
}

func TestConnCloseResetsRelayedStreamStillSending(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cause   error
		endSent bool
	}{
		{"application still sending", errors.New("peer closed the connection"), false},
		{"pool closed", ErrPoolClosed, true},
		{"server closed", errServerClosed, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := closeTestConn(t)
			relayTestSink(t, s)
			s.onData(bytes.Repeat([]byte{'x'}, 1<<20), 1<<20, true)
			if tc.endSent {
				endSendUnrecorded(s)
			}
			c.fail(tc.cause)
			c.wait() // the interrupted drainer ends
			s.mu.Lock()
			defer s.mu.Unlock()
			if !errors.Is(s.err, errConnClosed) || !errors.Is(s.err, tc.cause) {
				t.Fatalf("stream error %v; want a reset because the connection closed (%v)", s.err, tc.cause)
			}
		})
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }
