package hbone

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// frameHeaderLen is the size of an HTTP/2 frame header (RFC 9113 §4.1).
const frameHeaderLen = 9

// Sizes of the write path (see docs/hbone.md, "Write coalescing").
const (
	// maxBatch is the most bytes of TLS records batchConn holds before it
	// writes them out, so that one write(2) carries many records.
	maxBatch = 256 << 10
	// maxPending is the most plaintext frame bytes queued behind a writer
	// before further DATA writers wait (control frames never wait).
	maxPending = 256 << 10
	// keepBuf is the largest buffer the write path keeps between batches;
	// larger ones are dropped so that an idle connection pins little.
	keepBuf = 128 << 10
)

// batchConn sits under the tls.Conn. crypto/tls hands every record to
// the underlying connection with its own Write, so without it each 16 KiB
// record (and each small frame) costs one write(2). While a batch is open
// the records are collected and flush writes them with one system call.
// Outside a batch (the handshake, a KeyUpdate answer from the read side)
// writes go straight through.
type batchConn struct {
	net.Conn
	mu       sync.Mutex
	batching bool
	buf      []byte
	// rc is the socket under Conn (nil if it is not one), resolved once
	// by newBatchConn; nbw writes to it without waiting.
	rc  syscall.RawConn
	nbw nbWriter
	// stall bounds a blocking write (0: unbounded); wdl is the deadline
	// set with setWriteDeadline, in Unix nanoseconds (0: none).
	stall time.Duration
	wdl   atomic.Int64

	// Read side (read.go), used by crypto/tls under its input lock and
	// by the read loop.
	in      *[]byte // read from the socket, not yet taken: (*in)[inOff:]
	inOff   int
	recLeft int                      // bytes of the current TLS record still to be taken
	ahead   int                      // whole records taken since crypto/tls last asked for more
	hdr     [tlsRecordHeaderLen]byte // the record header being taken
	hdrN    int                      // how much of it
	evented bool                     // inside the read loop's callback: never read the socket
	dr      drainReader
}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.batching {
		return b.Conn.Write(p)
	}
	if len(b.buf) > 0 && len(b.buf)+len(p) > maxBatch {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	b.buf = append(b.buf, p...)
	return len(p), nil
}

// flushTry writes what the batch holds with non-blocking writes and
// closes the batch. It reports whether everything went out; what did not
// stays for flush, which waits for the socket.
func (b *batchConn) flushTry() (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	if len(b.buf) == 0 {
		return true, nil
	}
	if b.rc == nil {
		return true, b.flushLocked()
	}
	n, err := b.nbw.write(b.rc, b.buf)
	if err != nil {
		return true, err
	}
	if n < len(b.buf) {
		m := copy(b.buf, b.buf[n:])
		b.buf = b.buf[:m]
		return false, nil
	}
	if cap(b.buf) > keepBuf {
		b.buf = nil
	} else {
		b.buf = b.buf[:0]
	}
	return true, nil
}

// nbWriter writes to a socket without waiting: as much as the socket
// takes now. Its fields carry the callback's arguments and results, so
// that a write allocates nothing; one goroutine at a time uses it.
type nbWriter struct {
	p   []byte
	n   int
	err error
	fn  func(fd uintptr) bool
}

func (w *nbWriter) write(rc syscall.RawConn, p []byte) (int, error) {
	if w.fn == nil {
		w.fn = w.do
	}
	w.p, w.n, w.err = p, 0, nil
	err := rc.Write(w.fn)
	n, werr := w.n, w.err
	w.p = nil
	if err != nil {
		return n, err
	}
	return n, werr
}

func (w *nbWriter) do(fd uintptr) bool {
	for w.n < len(w.p) {
		n, err := sysWrite(int(fd), w.p[w.n:])
		if n > 0 {
			w.n += n
		}
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return true
		case err != nil:
			w.err = os.NewSyscallError("write", err)
			return true
		case n <= 0:
			return true
		}
	}
	return true
}

func newBatchConn(c net.Conn) *batchConn {
	return &batchConn{Conn: c, rc: rawConn(c)}
}

// start opens a batch.
func (b *batchConn) start() {
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

// flush writes what the batch holds and closes the batch.
func (b *batchConn) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	return b.flushLocked()
}

func (b *batchConn) flushLocked() error {
	if len(b.buf) == 0 {
		return nil
	}
	var err error
	if b.stall <= 0 {
		_, err = b.Conn.Write(b.buf)
	} else {
		// Bounded: a peer that does not take our bytes for the stall
		// time is as dead as one that does not answer a PING, but it
		// could keep sending PINGs itself (see conn.keeper).
		err = b.writeBounded(b.buf)
	}
	if cap(b.buf) > keepBuf {
		b.buf = nil
	} else {
		b.buf = b.buf[:0]
	}
	return err
}

// writeBounded writes p: what the socket takes at once, then the rest
// with a write deadline of b.stall from now (or the connection's own
// deadline, if earlier), so that the common case sets no timer.
func (b *batchConn) writeBounded(p []byte) error {
	n := 0
	if b.rc != nil {
		var err error
		if n, err = b.nbw.write(b.rc, p); err != nil {
			return err
		}
	}
	if n == len(p) {
		return nil
	}
	dl := time.Now().Add(b.stall)
	if own := b.wdl.Load(); own != 0 && own < dl.UnixNano() {
		dl = time.Unix(0, own)
	}
	_ = b.Conn.SetWriteDeadline(dl)
	_, err := b.Conn.Write(p[n:])
	_ = b.Conn.SetWriteDeadline(b.writeDeadline())
	return err
}

// setWriteDeadline sets the connection's own write deadline (the keeper's
// writes, a graceful close), which bounded writes respect and restore.
func (b *batchConn) setWriteDeadline(t time.Time) {
	if t.IsZero() {
		b.wdl.Store(0)
	} else {
		b.wdl.Store(t.UnixNano())
	}
	_ = b.Conn.SetWriteDeadline(t)
}

func (b *batchConn) writeDeadline() time.Time {
	if v := b.wdl.Load(); v != 0 {
		return time.Unix(0, v)
	}
	return time.Time{}
}

// pendBuf is the io.Writer under the connection's frame-writing Framer:
// frames are appended to the pending batch (guarded by conn.wmu).
type pendBuf struct{ b []byte }

func (p *pendBuf) Write(x []byte) (int, error) {
	p.b = append(p.b, x...)
	return len(x), nil
}

// putDataHeader writes a DATA frame header for a payload of n bytes into
// h[:9].
func putDataHeader(h []byte, n int, streamID uint32, end bool) {
	h[0], h[1], h[2] = byte(n>>16), byte(n>>8), byte(n)
	h[3] = 0 // DATA
	h[4] = 0
	if end {
		h[4] = 1 // END_STREAM
	}
	h[5], h[6], h[7], h[8] = byte(streamID>>24)&0x7f, byte(streamID>>16), byte(streamID>>8), byte(streamID)
}

// relayBufSize is the size of the buffer a relay reads the application
// socket into: large reads mean few system calls per byte, and the DATA
// frames cut from one read leave in one TLS write.
const relayBufSize = 64 << 10

var relayBufs = sync.Pool{New: func() any {
	b := make([]byte, frameHeaderLen+relayBufSize)
	return &b
}}
