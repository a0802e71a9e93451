package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// copyBufSize is the size of pooled copy buffers: four full TLS records.
// A copying goroutine holds one buffer for its lifetime, so an open
// connection costs at most two.
const copyBufSize = 64 << 10

var bufPool = sync.Pool{New: func() any {
	b := make([]byte, copyBufSize)
	return &b
}}

// copyCounted copies src to dst until src returns io.EOF (reported as nil)
// or an error, adding the bytes moved to n as they go. It allocates
// nothing per read.
func copyCounted(dst io.Writer, src io.Reader, n *atomic.Int64) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n.Add(int64(nw))
			if werr != nil {
				return werr
			}
			if nw != nr {
				return io.ErrShortWrite
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return nil
			}
			return rerr
		}
	}
}

// copyTCP copies between two TCP sockets with splice(2) when both are
// *net.TCPConn (no user-space buffer at all), else with copyCounted.
func copyTCP(dst, src net.Conn, n *atomic.Int64) error {
	if d, ok := dst.(*net.TCPConn); ok {
		if s, ok := src.(*net.TCPConn); ok {
			w, err := d.ReadFrom(s)
			n.Add(w)
			return err
		}
	}
	return copyCounted(dst, src, n)
}

type closeWriter interface{ CloseWrite() error }

// closeWrite half-closes c, or closes it if it cannot half-close.
func closeWrite(c net.Conn) {
	if cw, ok := c.(closeWriter); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	c.Close()
}

// resetConn closes c with an RST, so that the application sees its
// connection refused or reset at once rather than a clean EOF.
func resetConn(c net.Conn) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	}
	c.Close()
}

// pipeConns copies both ways between two plain connections: the calling
// goroutine moves a->b, one more moves b->a. EOF on one side half-closes
// the other; an error resets both. It returns when both directions are
// done and both connections are closed, and reports whether it reset them.
func pipeConns(a, b net.Conn, aToB, bToA *atomic.Int64) bool {
	var failed atomic.Bool
	fail := func() {
		if failed.CompareAndSwap(false, true) {
			resetConn(a)
			resetConn(b)
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := copyTCP(a, b, bToA); err != nil {
			fail()
			return
		}
		closeWrite(a)
	}()
	if err := copyTCP(b, a, aToB); err != nil {
		fail()
	} else {
		closeWrite(b)
	}
	<-done
	a.Close()
	b.Close()
	return failed.Load()
}

// connBody is the request body of an outbound HBONE stream: the HTTP/2
// transport's own goroutine reads the application's bytes from it, so the
// outbound direction needs no goroutine of ours.
type connBody struct {
	c       net.Conn
	n       *atomic.Int64
	once    sync.Once
	done    chan struct{} // closed when the transport is finished with the body
	readErr atomic.Bool   // a read failed with something other than EOF
	closed  atomic.Bool   // Close was called; later read errors are its doing
}

func newConnBody(c net.Conn, n *atomic.Int64) *connBody {
	return &connBody{c: c, n: n, done: make(chan struct{})}
}

func (b *connBody) Read(p []byte) (int, error) {
	n, err := b.c.Read(p)
	b.n.Add(int64(n))
	if err != nil && err != io.EOF {
		if !b.closed.Load() {
			b.readErr.Store(true)
		}
		if errors.Is(err, net.ErrClosed) {
			err = io.ErrUnexpectedEOF
		}
	}
	return n, err
}

// err reports whether reading the application failed (a reset), once done
// is closed. A read cut short by Close after the stream ended is not one.
func (b *connBody) err() error {
	if b.readErr.Load() {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// Close is called by the transport when the stream's request side ends,
// normally or not. It unblocks a pending Read without touching the socket's
// state: the response direction may still be writing to it.
func (b *connBody) Close() error {
	b.once.Do(func() {
		b.closed.Store(true)
		_ = b.c.SetReadDeadline(time.Unix(1, 0))
		close(b.done)
	})
	return nil
}
