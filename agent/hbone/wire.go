package hbone

import (
	"net"
	"sync"
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
	_, err := b.Conn.Write(b.buf)
	if cap(b.buf) > keepBuf {
		b.buf = nil
	} else {
		b.buf = b.buf[:0]
	}
	return err
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
