package hbone

import (
	"bytes"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab/waitfor"
	"golang.org/x/sys/unix"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

type readResult struct {
	n              int
	eof, drained   bool
	err            error
	data           []byte
	pendingSockErr error
}

// drainRead runs one drainReader.read on c's socket.
func drainRead(t *testing.T, c *net.TCPConn, size int) readResult {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var r drainReader
	buf := make([]byte, size)
	var res readResult
	if err := rc.Control(func(fd uintptr) {
		res.n, res.eof, res.drained, res.err = r.read(int(fd), buf)
	}); err != nil {
		t.Fatal(err)
	}
	res.data = buf[:res.n]
	res.pendingSockErr = socketError(rawConn(c))
	return res
}

// waitState waits until c's socket is in TCP state want (Linux numbers:
// 1 established, 7 closed, 8 close-wait) with at least n bytes queued, so
// that one read sees the data and the FIN or reset together: the case a
// short read(2) cannot tell apart from a drained socket.
func waitState(t *testing.T, c *net.TCPConn, want uint8, n int) {
	t.Helper()
	rc, _ := c.SyscallConn()
	waitfor.True(t, 10*time.Second, "the peer's bytes and FIN or reset to arrive", func() bool {
		var state uint8
		var inq int
		rc.Control(func(fd uintptr) {
			if ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				state = ti.State
			}
			inq, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		})
		return state == want && inq >= n
	})
}

func TestDrainReader(t *testing.T) {
	const (
		established = 1
		closed      = 7
		closeWait   = 8
	)
	hello := []byte("hello")
	tests := []struct {
		name    string
		peer    func(p *net.TCPConn)
		state   uint8
		queued  int
		size    int
		want    []byte
		eof     bool
		drained bool
		err     error
		sockErr error
	}{
		{name: "nothing", peer: func(*net.TCPConn) {}, state: established, err: syscall.EAGAIN},
		{name: "data", peer: func(p *net.TCPConn) { p.Write(hello) }, state: established, queued: 5, want: hello, drained: true},
		{name: "data and FIN", peer: func(p *net.TCPConn) { p.Write(hello); p.CloseWrite() }, state: closeWait, queued: 5, want: hello, eof: true},
		{name: "FIN", peer: func(p *net.TCPConn) { p.CloseWrite() }, state: closeWait, eof: true},
		// Either the read reports the reset, or it returns the data and
		// the reset waits in SO_ERROR, where the keeper finds it.
		{name: "data and reset", peer: func(p *net.TCPConn) { p.Write(hello); p.SetLinger(0); p.Close() },
			state: closed, queued: 5, want: hello, drained: true, sockErr: syscall.ECONNRESET},
		{name: "more than fits", peer: func(p *net.TCPConn) { p.Write(bytes.Repeat([]byte("0123456789abcdef"), 2048)) },
			state: established, queued: 32 << 10, size: 16 << 10, want: bytes.Repeat([]byte("0123456789abcdef"), 1024)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, p := tcpPair(t)
			tt.peer(p)
			waitState(t, c, tt.state, tt.queued)
			size := tt.size
			if size == 0 {
				size = 64 << 10
			}
			got := drainRead(t, c, size)
			if tt.sockErr != nil && errors.Is(got.err, tt.sockErr) && got.n == 0 {
				// This kernel drops the data on a reset and reports the
				// reset at once, which is as good.
				return
			}
			if !errors.Is(got.err, tt.err) || !bytes.Equal(got.data, tt.want) || got.eof != tt.eof || got.drained != tt.drained {
				t.Errorf("read %q eof %v drained %v err %v; want %q eof %v drained %v err %v",
					got.data, got.eof, got.drained, got.err, tt.want, tt.eof, tt.drained, tt.err)
			}
			if !errors.Is(got.pendingSockErr, tt.sockErr) || (tt.sockErr == nil) != (got.pendingSockErr == nil) {
				t.Errorf("SO_ERROR after the read: %v, want %v", got.pendingSockErr, tt.sockErr)
			}
		})
	}
}
