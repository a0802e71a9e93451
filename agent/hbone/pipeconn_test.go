package hbone_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/nodemesh/nodemesh/agent/hbone"
)

// streamConnPair opens one stream and returns both ends as StreamConns:
// the client's (Stream.Conn) and the server's (Tunnel.Conn). The server's
// handler returns once stop ran.
type streamConnPair struct {
	e      *env
	pool   *hbone.Pool
	key    hbone.Key
	conns  chan served
	reads  atomic.Int64
	writes atomic.Int64
}

// served is the server's end of a stream; closing done lets its handler
// return.
type served struct {
	sc   *hbone.StreamConn
	done chan struct{}
}

func newStreamConnPair(t *testing.T) *streamConnPair {
	e := newEnv(t)
	p := &streamConnPair{e: e, conns: make(chan served, 1)}
	_, addr := e.startServer(t, handlerFunc(func(ctx context.Context, req *hbone.Request, tu *hbone.Tunnel) {
		if err := tu.Accept(); err != nil {
			return
		}
		sc, err := tu.Conn(&net.TCPAddr{}, &net.TCPAddr{}, &p.reads, &p.writes)
		if err != nil {
			t.Errorf("Tunnel.Conn: %v", err)
			return
		}
		done := make(chan struct{})
		p.conns <- served{sc, done}
		select {
		case <-done:
		case <-ctx.Done(): // reset, or the server closed
		}
		sc.Close()
	}), nil)
	p.pool = e.newPool(t, nil)
	p.key = e.key(addr)
	return p
}

// open opens a stream; release lets the server's handler return (after
// the test closed both ends).
func (p *streamConnPair) open(t *testing.T) (client, server *hbone.StreamConn, release func()) {
	t.Helper()
	s, err := p.pool.Connect(context.Background(), hbone.ConnectRequest{Key: p.key, Target: target})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	client, err = s.Conn(&net.TCPAddr{}, &net.TCPAddr{}, nil, nil)
	if err != nil {
		t.Fatalf("Stream.Conn: %v", err)
	}
	select {
	case sv := <-p.conns:
		return client, sv.sc, func() { close(sv.done) }
	case <-time.After(20 * time.Second):
		t.Fatal("the server's handler did not start")
	}
	return nil, nil, nil
}

// StreamConn passes x/net's net.Conn conformance tests (deadlines,
// concurrent use, Close unblocking Read and Write), with the client end
// as the first connection and with the server end.
func TestStreamConnConformance(t *testing.T) {
	p := newStreamConnPair(t)
	for _, order := range []string{"client-first", "server-first"} {
		t.Run(order, func(t *testing.T) {
			nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
				client, server, release := p.open(t)
				stop = func() {
					client.Close()
					server.Close()
					release()
				}
				if order == "server-first" {
					return server, client, stop, nil
				}
				return client, server, stop, nil
			})
		})
	}
}

// Half-close, byte counts, Reset and the results after Close.
func TestStreamConnHalfCloseAndReset(t *testing.T) {
	p := newStreamConnPair(t)
	client, server, release := p.open(t)
	defer release()
	if _, err := client.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "request" {
		t.Fatalf("server read %q, %v; want the request, then EOF", got, err)
	}
	// The other direction still works after the client's half-close.
	if _, err := server.Write([]byte("response")); err != nil {
		t.Fatal(err)
	}
	server.Close()
	got, err = io.ReadAll(client)
	if err != nil || string(got) != "response" {
		t.Fatalf("client read %q, %v; want the response, then EOF", got, err)
	}
	client.Close()
	if client.Failed() || server.Failed() {
		t.Errorf("a clean close counted as failed (client %v, server %v)", client.Failed(), server.Failed())
	}
	if r, w := p.reads.Load(), p.writes.Load(); r != 7 || w != 8 {
		t.Errorf("server counted %d bytes read and %d written, want 7 and 8", r, w)
	}
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read after Close: %v, want net.ErrClosed", err)
	}

	// Reset: the peer's waiting Read fails (not EOF), and its Close
	// reports the failure.
	client, server, release2 := p.open(t)
	defer release2()
	errc := make(chan error, 1)
	go func() {
		_, err := server.Read(make([]byte, 10))
		errc <- err
	}()
	client.Reset()
	client.Close()
	select {
	case err := <-errc:
		if err == nil || err == io.EOF {
			t.Fatalf("server Read after the client's Reset: %v, want an error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server Read still waiting after the client's Reset")
	}
	server.Close()
	if !client.Failed() || !server.Failed() {
		t.Errorf("a reset stream not counted as failed (client %v, server %v)", client.Failed(), server.Failed())
	}
}

// A deadline moved later while a Read waits does not fire at the old
// time; one cleared does not fire at all.
func TestStreamConnDeadlineMoved(t *testing.T) {
	p := newStreamConnPair(t)
	client, server, release := p.open(t)
	defer release()
	defer client.Close()
	defer server.Close()
	start := time.Now()
	server.SetReadDeadline(start.Add(50 * time.Millisecond))
	server.SetReadDeadline(start.Add(300 * time.Millisecond))
	_, err := server.Read(make([]byte, 1))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read: %v, want a timeout", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("Read timed out after %v, before the moved deadline", d)
	}
	server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	server.SetReadDeadline(time.Time{})
	go func() {
		time.Sleep(200 * time.Millisecond)
		client.Write([]byte("x"))
	}()
	if n, err := server.Read(make([]byte, 1)); n != 1 || err != nil {
		t.Fatalf("Read with the deadline cleared: %d, %v", n, err)
	}
}

// Closing the client's end while the server has not ended its side is a
// clean close, not a reset: the server still reads everything the client
// sent, then EOF, even when it reads only after the close went out (a
// RST_STREAM would have discarded what it had not read yet).
func TestStreamConnClientCloseIsClean(t *testing.T) {
	p := newStreamConnPair(t)
	client, server, release := p.open(t)
	defer release()
	if _, err := client.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	client.Close()
	time.Sleep(100 * time.Millisecond) // what the close sends has arrived
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "last words" {
		t.Fatalf("server read %q, %v; want everything, then EOF", got, err)
	}
	// The server's answer after the client's close is dropped, not an
	// error for the server.
	if _, err := server.Write([]byte("too late")); err != nil {
		t.Fatalf("server Write after the client's clean close: %v", err)
	}
	server.Close()
	if client.Failed() || server.Failed() {
		t.Errorf("a clean close counted as failed (client %v, server %v)", client.Failed(), server.Failed())
	}
}
