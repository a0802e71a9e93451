package hbone

import (
	"errors"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestRawSocketCallsNeverWait: the raw calls hold their P, so they must
// return EAGAIN rather than wait even on a socket in blocking mode, and
// a write to a peer that is gone is an EPIPE, not a signal.
func TestRawSocketCallsNeverWait(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0) // blocking mode
	if err != nil {
		t.Fatal(err)
	}
	a, b := fds[0], fds[1]
	defer unix.Close(a)
	buf := make([]byte, 1<<16)
	if _, err := sysRead(a, buf); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("read of an empty blocking socket: %v, want EAGAIN", err)
	}
	var mm [2]mmsghdr
	var iov [2]unix.Iovec
	for i := range mm {
		iov[i].Base = &buf[i*1024]
		iov[i].SetLen(1024)
		mm[i].hdr.Iov, mm[i].hdr.Iovlen = &iov[i], 1
	}
	if _, e := sysRecvmmsg(a, unsafe.Pointer(&mm[0]), 2); e != syscall.EAGAIN {
		t.Fatalf("recvmmsg of an empty blocking socket: %v, want EAGAIN", e)
	}
	total := 0
	for {
		n, err := sysWrite(b, buf)
		if errors.Is(err, syscall.EAGAIN) {
			break
		}
		if err != nil || n <= 0 {
			t.Fatalf("write: %d, %v", n, err)
		}
		if total += n; total > 64<<20 {
			t.Fatal("a blocking socket took 64 MiB without EAGAIN")
		}
	}
	n, err := sysRead(a, buf[:100])
	if err != nil || n != 100 {
		t.Fatalf("read: %d, %v", n, err)
	}
	unix.Close(b)
	for {
		n, err := sysRead(a, buf)
		if err != nil {
			t.Fatalf("read after the peer closed: %v", err)
		}
		if n == 0 {
			break // EOF after the queued data
		}
	}
	if _, err := sysWrite(a, buf[:1]); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("write to a closed peer: %v, want EPIPE", err)
	}
}
