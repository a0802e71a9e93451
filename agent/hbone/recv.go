package hbone

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// drainReader reads a non-blocking TCP socket so that the caller can tell,
// from one system call, that the socket is drained and may be left to the
// poller until its next edge of readability (see read.go).
//
// A short read(2) is not enough for that: when the peer's FIN (or more
// data and then the FIN) was queued before the read, the read returns the
// data and the FIN raises no new edge, so a reader waiting for one would
// wait forever. So the read is a recvmmsg(2) of two messages. The second
// reads on after the first: EAGAIN there means the socket is drained and
// anything that arrives later raises a new edge; 0 bytes there means the
// FIN; more data means the caller reads again. A TCP reset queued behind
// the data is the one case the second message cannot report (recvmmsg
// keeps the error for the next call and returns the first message only);
// the callers look for it another way (keeper: SO_ERROR; relay: a read
// after a quiet second).
type drainReader struct {
	msgs [2]mmsghdr
	iov  [2]unix.Iovec
}

// mmsghdr is struct mmsghdr of recvmmsg(2).
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
	_   [4]byte
}

// tailLen is the size of the second message's buffer: data that arrives
// between the two reads lands there and is moved up behind the first.
const tailLen = 4 << 10

// read reads into p (at least 2*tailLen bytes). It returns the number of
// bytes read; eof when the peer's FIN followed them (or n is 0 and the
// error nil); drained when the socket had nothing more and the caller may
// wait for the next edge; err syscall.EAGAIN when there was nothing at all.
func (r *drainReader) read(fd int, p []byte) (n int, eof, drained bool, err error) {
	head := len(p) - tailLen
	r.iov[0].Base = &p[0]
	r.iov[0].SetLen(head)
	r.iov[1].Base = &p[head]
	r.iov[1].SetLen(tailLen)
	for i := range r.msgs {
		r.msgs[i] = mmsghdr{}
		r.msgs[i].hdr.Iov = &r.iov[i]
		r.msgs[i].hdr.Iovlen = 1
	}
	for {
		got, e := sysRecvmmsg(fd, unsafe.Pointer(&r.msgs[0]), 2)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return 0, false, false, e
		}
		n0 := int(r.msgs[0].n)
		if n0 == 0 {
			return 0, true, false, nil
		}
		if got == 1 {
			return n0, false, true, nil
		}
		n1 := int(r.msgs[1].n)
		if n1 == 0 {
			return n0, true, false, nil
		}
		if n0 < head {
			copy(p[n0:], p[head:head+n1])
		}
		return n0 + n1, false, false, nil
	}
}
