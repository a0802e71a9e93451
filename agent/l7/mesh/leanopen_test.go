package mesh

import (
	"bufio"
	"net"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/l7"
)

// An idle upstream socket is reused for a request that cannot be sent
// twice only while a peek finds it quiet: not once the peer closed it or
// sent something unasked.
func TestLeanUpOpen(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pair := func() (*leanUp, net.Conn) {
		accepted := make(chan net.Conn, 1)
		go func() {
			c, _ := ln.Accept()
			accepted <- c
		}()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		peer := <-accepted
		if peer == nil {
			t.Fatal("accept failed")
		}
		rw := l7.RawIO(c)
		u := &leanUp{conn: c, br: bufio.NewReader(rw), idleSince: time.Now()}
		t.Cleanup(func() { c.Close(); peer.Close() })
		return u, peer
	}
	wait := func() { time.Sleep(50 * time.Millisecond) }

	u, _ := pair()
	if !u.open() {
		t.Error("a quiet socket is not open")
	}
	// The peek is set up once per connection: later looks see what
	// happened since.
	u, peer := pair()
	for i := range 3 {
		if !u.open() {
			t.Fatalf("look %d: a quiet socket is not open", i)
		}
	}
	peer.Close()
	wait()
	if u.open() {
		t.Error("a socket the peer closed is open")
	}
	u, peer = pair()
	if _, err := peer.Write([]byte("HTTP/1.1 408 Request Timeout\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	wait()
	if u.open() {
		t.Error("a socket with unasked bytes is open")
	}

	// A connection with no socket under it (a tunnel stream) counts as
	// open only while it was idle under a second.
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	u = &leanUp{conn: a, br: bufio.NewReader(a), idleSince: time.Now()}
	if !u.open() {
		t.Error("a stream idle for a moment is not open")
	}
	u.idleSince = time.Now().Add(-2 * time.Second)
	if u.open() {
		t.Error("a stream idle for two seconds is open")
	}
}
