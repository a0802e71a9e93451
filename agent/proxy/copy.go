package proxy

import (
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/nodemesh/nodemesh/agent/hbone"
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

// pipeConns copies both ways between two plain connections: the calling
// goroutine moves a->b, one more moves b->a. EOF on one side half-closes
// the other; an error resets both. It returns when both directions are
// done and both connections are closed, and reports whether it reset them.
func pipeConns(a, b net.Conn, aToB, bToA *atomic.Int64) bool {
	var failed atomic.Bool
	fail := func() {
		if failed.CompareAndSwap(false, true) {
			hbone.ResetConn(a)
			hbone.ResetConn(b)
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
