package l7

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// RawIO returns c with Read and Write made as raw non-blocking system
// calls (recvfrom and sendto with MSG_DONTWAIT), waited for through the
// runtime's poller (syscall.RawConn), when c is a TCP socket (or a
// Replay of one); any other connection (a tunnel stream, a wrapper that
// counts bytes) is returned as it is. Everything but Read and Write is
// the socket's own (deadlines, Close, CloseWrite, SyscallConn).
//
// Why: net.Conn's Read and Write go through syscall.Syscall, whose
// entersyscall wakes the runtime's monitor thread (sysmon) whenever it
// sleeps because every P was idle, which an agent at light load is
// between almost every two events: a futex wake, sysmon's 20 µs sleeps,
// its futex sleep and two context switches per event (docs/hbone.md,
// rule 5; the tunnel's own socket calls are raw already). The L7 path's
// client socket (at the source agent) and application socket (at the
// destination) are read and written once or twice per request each.
//
// One Read and one Write may run at a time (as the lean path, net/http's
// server and the lean upstream pool use a connection).
func RawIO(c net.Conn) net.Conn {
	switch t := c.(type) {
	case *net.TCPConn:
		rc, err := t.SyscallConn()
		if err != nil {
			return c
		}
		r := &rawTCP{TCPConn: t, rc: rc}
		r.r.fn, r.w.fn = r.doRead, r.doWrite
		return r
	case *replayConn:
		if inner := RawIO(t.Conn); inner != t.Conn {
			return &replayConn{Conn: inner, prefix: t.prefix}
		}
	}
	return c
}

// rawTCP is a TCP socket read and written with raw system calls (RawIO).
// The operations' arguments and results live in r and w, so that a call
// allocates nothing.
type rawTCP struct {
	*net.TCPConn
	rc   syscall.RawConn
	r, w rawOp
}

type rawOp struct {
	p   []byte
	n   int
	err error
	fn  func(fd uintptr) bool
}

func (c *rawTCP) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.r.p, c.r.n, c.r.err = p, 0, nil
	err := c.rc.Read(c.r.fn)
	n, rerr := c.r.n, c.r.err
	c.r.p = nil
	switch {
	case err != nil:
		return n, c.opError("read", err)
	case rerr != nil:
		return n, c.opError("read", rerr)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// doRead is the poller's callback: false means "wait until readable".
func (c *rawTCP) doRead(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&c.r.p[0])), uintptr(len(c.r.p)), unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case 0:
			c.r.n = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		c.r.err = os.NewSyscallError("read", e)
		return true
	}
}

func (c *rawTCP) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.w.p, c.w.n, c.w.err = p, 0, nil
	err := c.rc.Write(c.w.fn)
	n, werr := c.w.n, c.w.err
	c.w.p = nil
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case werr != nil:
		return n, c.opError("write", werr)
	}
	return n, nil
}

// doWrite is the poller's callback: it writes until all of w.p is sent,
// or returns false to wait until the socket takes more.
func (c *rawTCP) doWrite(fd uintptr) bool {
	for c.w.n < len(c.w.p) {
		rest := c.w.p[c.w.n:]
		n, _, e := syscall.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL, 0, 0)
		switch e {
		case 0:
			c.w.n += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			c.w.err = os.NewSyscallError("write", e)
			return true
		}
	}
	return true
}

// opError wraps err as net's own Read and Write do (a deadline stays
// os.ErrDeadlineExceeded and a Timeout, a closed socket net.ErrClosed).
func (c *rawTCP) opError(op string, err error) error {
	if oe, ok := err.(*net.OpError); ok {
		// The poller's error (deadline, closed), named by raw-read or
		// raw-write: named as the operation the caller made.
		e := *oe
		e.Op = op
		return &e
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
