package hbone

import (
	"errors"
	"io"
	"os"
	"sync"
	"syscall"

	"golang.org/x/net/http2"
	"golang.org/x/sys/unix"
)

// The read side of a connection.
//
// Go's usual way to read a socket costs a system call that finds nothing
// every time the socket runs dry: Read returns EAGAIN, and only then does
// the goroutine wait in the poller. In a request/response exchange the
// socket is always dry when the next read starts, so every message costs
// that extra read(2) besides the one that carries it; on a virtual machine,
// where a system call is expensive, that is a large part of the proxy's
// CPU.
//
// So the read loop reads the TLS connection's socket inside one long
// syscall.RawConn.Read. Its callback reads what the socket holds into
// batchConn's input buffer, hands everything that forms whole TLS records
// and whole HTTP/2 frames to crypto/tls, the Framer and handleFrame, and
// then, when the read(2) returned less than it asked for (the socket is
// drained: what arrives later raises a new edge in the poller), returns
// false so that the runtime waits for readability without another read.
// crypto/tls reads from batchConn, which serves the buffered bytes and then
// reports errWouldBlock, a temporary error crypto/tls does not keep; a
// record cut in two stays in crypto/tls's own buffer until the rest
// arrives. The Framer reads from frameBuf, which holds decrypted bytes
// until they form a whole frame, so that it never sees half of one.
//
// The callback holds a reference on the socket, and Close of the socket
// waits for the callback to return. The read loop never blocks on anything
// but locks held briefly (it never writes to a socket; see write.go), and
// it never closes the connection itself from inside the callback: an error
// ends the callback first and the connection fails after.

// errWouldBlock is what batchConn and frameBuf report, inside the read
// loop's callback, when what has been read from the socket is used up. It
// is a temporary net.Error so that crypto/tls keeps the connection usable.
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "hbone: no more buffered input" }
func (wouldBlock) Timeout() bool   { return false }
func (wouldBlock) Temporary() bool { return true }

// inBufSize is the size of the buffer the read loop reads the socket into:
// several TLS records, so that bulk transfers take few read(2)s.
const inBufSize = 64 << 10

var inBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, inBufSize)
	return &b
}}

// Read serves crypto/tls: the bytes the read loop's callback read, or,
// outside the callback, what it reads from the socket itself. It counts
// the whole TLS records it hands over (ahead), so that the read loop knows,
// without asking crypto/tls, when it holds nothing it could decrypt (see
// frameBuf.fill).
func (b *batchConn) Read(p []byte) (int, error) {
	// crypto/tls reads only when it has no whole record left: every
	// record it was given is used up.
	b.ahead = 0
	if b.unread() > 0 {
		return b.take(p), nil
	}
	if b.evented {
		return 0, errWouldBlock
	}
	// Outside the callback (the handshake, the preface) the socket is read
	// into the same buffer, so that records are counted from the first
	// byte.
	space := b.readSpace()
	n, err := b.Conn.Read(space)
	*b.in = (*b.in)[:len(*b.in)+n]
	if n > 0 {
		return b.take(p), nil
	}
	b.releaseIn()
	return 0, err
}

// unread is how many bytes the callback read that crypto/tls has not taken.
func (b *batchConn) unread() int {
	if b.in == nil {
		return 0
	}
	return len(*b.in) - b.inOff
}

// tlsRecordHeaderLen is the size of a TLS record header (RFC 8446 §5.1).
const tlsRecordHeaderLen = 5

// take copies buffered input into p and counts the records it completes.
func (b *batchConn) take(p []byte) int {
	in := (*b.in)[b.inOff:]
	n := copy(p, in)
	b.inOff += n
	for in = in[:n]; len(in) > 0; {
		if b.recLeft == 0 {
			k := min(len(in), tlsRecordHeaderLen-b.hdrN)
			copy(b.hdr[b.hdrN:], in[:k])
			in, b.hdrN = in[k:], b.hdrN+k
			if b.hdrN < tlsRecordHeaderLen {
				break
			}
			b.hdrN = 0
			if b.recLeft = int(b.hdr[3])<<8 | int(b.hdr[4]); b.recLeft == 0 {
				b.ahead++
			}
			continue
		}
		k := min(len(in), b.recLeft)
		in, b.recLeft = in[k:], b.recLeft-k
		if b.recLeft == 0 {
			b.ahead++
		}
	}
	return n
}

// readSpace returns the free part of the input buffer, taking a buffer from
// the pool if it has none and dropping what crypto/tls already took.
func (b *batchConn) readSpace() []byte {
	if b.in == nil {
		b.in = inBufs.Get().(*[]byte)
	}
	if b.inOff == len(*b.in) {
		*b.in = (*b.in)[:0]
		b.inOff = 0
	}
	if cap(*b.in)-len(*b.in) < 2*tailLen {
		n := copy(*b.in, (*b.in)[b.inOff:])
		*b.in = (*b.in)[:n]
		b.inOff = 0
	}
	return (*b.in)[len(*b.in):cap(*b.in)]
}

// releaseIn returns the input buffer to the pool if crypto/tls took all of
// it, so that an idle connection holds none.
func (b *batchConn) releaseIn() {
	if b.in != nil && b.inOff == len(*b.in) {
		*b.in = (*b.in)[:0]
		inBufs.Put(b.in)
		b.in, b.inOff = nil, 0
	}
}

// frameBuf holds plaintext from crypto/tls until it forms a whole HTTP/2
// frame. The Framer reads from it, and only once fill said a frame (or the
// header of one too large to accept) is complete.
type frameBuf struct {
	src io.Reader // the tls.Conn
	bc  *batchConn
	buf *[]byte
	off int
	max int // the largest frame payload accepted
	// full: the last read from src filled the space it was given, so src
	// may hold more plaintext.
	full bool
}

// frameBufs hold a whole frame of the default size, so that a buffer taken
// from the pool never has to grow (and allocate) for one.
var frameBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, frameHeaderLen+DefaultMaxFrameSize)
	return &b
}}

func (b *frameBuf) Read(p []byte) (int, error) {
	if b.buf == nil || b.off == len(*b.buf) {
		return 0, io.ErrUnexpectedEOF // fill guarantees whole frames
	}
	n := copy(p, (*b.buf)[b.off:])
	b.off += n
	return n, nil
}

// fill reads plaintext until a whole frame is buffered. Inside the read
// loop's callback it returns errWouldBlock when the input read so far has
// no more.
func (b *frameBuf) fill() error {
	if b.buf == nil {
		b.buf = frameBufs.Get().(*[]byte)
	}
	for {
		have := (*b.buf)[b.off:]
		need := frameHeaderLen
		if len(have) >= frameHeaderLen {
			n := int(have[0])<<16 | int(have[1])<<8 | int(have[2])
			if n > b.max {
				return nil // the Framer refuses it after the header
			}
			need += n
			if len(have) >= need {
				return nil
			}
		}
		if cap(*b.buf)-b.off < need || cap(*b.buf) == len(*b.buf) {
			b.compact(need)
		}
		if b.bc.evented && !b.full && b.bc.ahead == 0 && b.bc.unread() == 0 {
			// crypto/tls holds at most part of a record (batchConn.Read):
			// do not ask it, which would cost it an allocation.
			return errWouldBlock
		}
		buf := *b.buf
		space := buf[len(buf):cap(buf)]
		wasFull := b.full
		n, err := b.src.Read(space)
		if n > 0 && !wasFull && b.bc.ahead > 0 {
			// Its plaintext was used up, so this read decrypted a
			// record (or more, which only makes ahead too large).
			b.bc.ahead--
		}
		b.full = n == len(space)
		*b.buf = buf[:len(buf)+n]
		if err != nil && !(n > 0 && err == errWouldBlock) {
			return err
		}
	}
}

// compact moves the unread bytes to the front, into a buffer with room
// for need bytes.
func (b *frameBuf) compact(need int) {
	have := (*b.buf)[b.off:]
	if cap(*b.buf) >= need && b.off > 0 {
		n := copy(*b.buf, have)
		*b.buf = (*b.buf)[:n]
		b.off = 0
		return
	}
	nb := make([]byte, len(have), max(need, 2*cap(*b.buf)))
	copy(nb, have)
	*b.buf = nb
	b.off = 0
}

// release returns the buffer to the pool once it holds nothing unread.
func (b *frameBuf) release() {
	if b.buf != nil && b.off == len(*b.buf) {
		*b.buf = (*b.buf)[:0]
		if cap(*b.buf) <= keepBuf {
			frameBufs.Put(b.buf)
		}
		b.buf, b.off = nil, 0
	}
}

// readBuffered reads and handles frames until there is no whole frame
// left in what was read (errWouldBlock, inside the callback) or the
// connection fails.
func (c *conn) readBuffered() error {
	for {
		if err := c.fb.fill(); err != nil {
			return err
		}
		f, err := c.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.resetStream(se.StreamID, se.Code)
				continue
			}
			if errors.Is(err, http2.ErrFrameTooLarge) {
				return protoError{http2.ErrCodeFrameSize, "frame larger than SETTINGS_MAX_FRAME_SIZE"}
			}
			return err
		}
		c.frames.Add(1)
		if err := c.handleFrame(f); err != nil {
			return err
		}
	}
}

// readEvented is the read loop on a socket: see the top of this file.
func (c *conn) readEvented(rc syscall.RawConn) error {
	bc := c.bc
	bc.evented = true
	defer func() {
		bc.evented = false
		bc.releaseIn()
		c.fb.release()
	}()
	var ferr error
	err := rc.Read(func(fd uintptr) bool {
		for {
			if ferr = c.readBuffered(); ferr != errWouldBlock {
				return true
			}
			n, eof, drained, err := bc.dr.read(int(fd), bc.readSpace())
			switch {
			case err == syscall.EAGAIN:
				bc.releaseIn()
				c.fb.release()
				return false
			case err != nil:
				ferr = os.NewSyscallError("recvmmsg", err)
				return true
			}
			*bc.in = (*bc.in)[:len(*bc.in)+n]
			if !eof && !drained {
				continue
			}
			// Handle what came; then either the peer's FIN, or wait for
			// the next edge instead of reading again to hear EAGAIN.
			if ferr = c.readBuffered(); ferr != errWouldBlock {
				return true
			}
			if eof {
				ferr = io.EOF
				return true
			}
			bc.releaseIn()
			c.fb.release()
			return false
		}
	})
	if err != nil {
		return err
	}
	return ferr
}

// socketError returns the error pending on socket rc (SO_ERROR), which
// also clears it: a reset that arrived together with data, which the read
// loop's drained reads cannot see (recv.go).
func socketError(rc syscall.RawConn) error {
	if rc == nil {
		return nil
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		switch {
		case err != nil:
			serr = os.NewSyscallError("getsockopt SO_ERROR", err)
		case v != 0:
			serr = syscall.Errno(v)
		}
	}); err != nil {
		return err
	}
	return serr
}

// rawConn returns the socket under nc, or nil.
func rawConn(nc any) syscall.RawConn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}
