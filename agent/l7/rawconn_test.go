package l7

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// A socket read and written with raw system calls behaves as net's own:
// data both ways (more than the socket buffers take at once), EOF after
// the peer's half-close, a read deadline that is a timeout, and Close
// ending a waiting Read with net.ErrClosed.
func TestRawIO(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peerc := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			peerc <- nil
			return
		}
		peerc <- c
	}()
	dialled, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer := <-peerc
	if peer == nil {
		t.Fatal("accept failed")
	}
	defer peer.Close()
	c := RawIO(dialled)
	if _, ok := c.(*rawTCP); !ok {
		t.Fatalf("RawIO of a TCP socket gave %T", c)
	}
	if r := RawIO(Replay(dialled, []byte("x"))); r.(*replayConn).Conn.(*rawTCP) == nil {
		t.Fatal("RawIO of a Replay did not reach the socket")
	}

	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB: the write waits for the reader
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(peer, int64(len(big))))
		got <- b
	}()
	if n, err := c.Write(big); n != len(big) || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	if b := <-got; !bytes.Equal(b, big) {
		t.Fatalf("the peer read %d bytes, not what was written", len(b))
	}

	if _, err := peer.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	_ = peer.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "hello" {
		t.Fatalf("ReadAll: %q, %v", b, err)
	}

	_ = c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("Read after EOF: %v", err)
	}

	// A fresh pair for the deadline and Close: the first one is at EOF.
	go func() {
		c2, err := ln.Accept()
		if err != nil {
			peerc <- nil
			return
		}
		peerc <- c2
	}()
	d2, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	p2 := <-peerc
	defer p2.Close()
	c2 := RawIO(d2)
	_ = c2.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err = c2.Read(make([]byte, 1))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past its deadline: %v", err)
	}
	_ = c2.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := c2.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	c2.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read ended by Close: %v", err)
	}
	if _, err := c2.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after Close: %v", err)
	}
}
