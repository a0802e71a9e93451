package hbone

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
)

// sink is the application socket a relaying stream delivers to.
type sink struct {
	conn net.Conn
	rc   syscall.RawConn // nil: no non-blocking writes, always via the drainer
	n    *atomic.Int64   // bytes delivered

	// Arguments and results of tryWrite's callback, so that calling it
	// allocates nothing; only one goroutine writes to a sink at a time.
	p    []byte
	wn   int
	werr error
	fn   func(fd uintptr) bool

	// The same for reads: rb is a relay buffer taken from the pool only
	// while there is data to read, so an idle stream holds none.
	rb   *[]byte
	rn   int
	rerr error
	rfn  func(fd uintptr) bool
}

func newSink(app net.Conn, n *atomic.Int64) *sink {
	k := &sink{conn: app, n: n}
	if sc, ok := app.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			k.rc = rc
		}
	}
	k.fn = k.doWrite
	k.rfn = k.doRead
	return k
}

// read reads the next chunk from the application into a pooled relay
// buffer, after the frame header room; release the buffer with done. On a
// socket it waits for readability before it takes a buffer.
func (k *sink) read() (*[]byte, int, error) {
	if k.rc == nil {
		bp := relayBufs.Get().(*[]byte)
		n, err := k.conn.Read((*bp)[frameHeaderLen:])
		return bp, n, err
	}
	k.rn, k.rerr = 0, nil
	if err := k.rc.Read(k.rfn); err != nil {
		if k.rb != nil {
			relayBufs.Put(k.rb)
			k.rb = nil
		}
		return nil, 0, err
	}
	bp := k.rb
	k.rb = nil
	if bp == nil {
		return nil, 0, k.rerr
	}
	return bp, k.rn, k.rerr
}

func (k *sink) doRead(fd uintptr) bool {
	if k.rb == nil {
		k.rb = relayBufs.Get().(*[]byte)
	}
	for {
		n, err := syscall.Read(int(fd), (*k.rb)[frameHeaderLen:])
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			relayBufs.Put(k.rb)
			k.rb = nil
			return false // wait until readable
		case err != nil:
			k.rerr = err
		case n == 0:
			k.rerr = io.EOF
		default:
			k.rn = n
		}
		return true
	}
}

// tryWrite writes as much of p as the socket takes without blocking.
func (k *sink) tryWrite(p []byte) (int, error) {
	if k.rc == nil {
		return 0, nil
	}
	k.p, k.wn, k.werr = p, 0, nil
	err := k.rc.Write(k.fn)
	n, werr := k.wn, k.werr
	k.p = nil
	k.n.Add(int64(n))
	if err != nil {
		return n, err
	}
	return n, werr
}

func (k *sink) doWrite(fd uintptr) bool {
	for k.wn < len(k.p) {
		n, err := syscall.Write(int(fd), k.p[k.wn:])
		if n > 0 {
			k.wn += n
		}
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return true
		case err != nil:
			k.werr = err
			return true
		case n <= 0:
			return true
		}
	}
	return true
}

// write writes p, blocking.
func (k *sink) write(p []byte) (int, error) {
	n, err := k.conn.Write(p)
	k.n.Add(int64(n))
	return n, err
}

// closeWrite passes the peer's END_STREAM on: a FIN, or a close for
// connections that cannot half-close.
func (k *sink) closeWrite() {
	if cw, ok := k.conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		return
	}
	_ = k.conn.Close()
}

var longAgo = time.Unix(1, 0)

// interrupt unblocks the relay's read of the socket and a drainer's write.
func (k *sink) interrupt() {
	_ = k.conn.SetReadDeadline(longAgo)
	_ = k.conn.SetWriteDeadline(longAgo)
}

func (k *sink) interruptRead() { _ = k.conn.SetReadDeadline(longAgo) }

// relay copies between app and the stream until both directions are
// over; see Stream.Relay.
func (s *stream) relay(app net.Conn, sent, recv *atomic.Int64) error {
	k := newSink(app, recv)
	s.mu.Lock()
	if s.sink != nil {
		s.mu.Unlock()
		return errors.New("hbone: stream is already relaying")
	}
	s.sink = k
	// A reset or STOP that came before the sink was registered could not
	// interrupt it; the read below would then wait for the application
	// forever.
	interrupt, interruptRead := s.err != nil, s.sentEnd
	var startDrain, closeSink bool
	if s.err == nil && !s.writing {
		switch {
		case s.buffered() > 0:
			s.writing, startDrain = true, true
		case s.recvEnd && !s.sinkEOF:
			s.sinkEOF, s.writing, closeSink = true, true, true
		}
	}
	s.mu.Unlock()
	switch {
	case interrupt:
		k.interrupt()
	case interruptRead:
		k.interruptRead()
	}
	if closeSink {
		k.closeWrite()
		s.mu.Lock()
		s.writing = false
		s.cond.Broadcast()
		s.mu.Unlock()
	}
	if startDrain {
		s.c.wg.Add(1)
		go s.drain()
	}

	var err error
	for {
		bp, n, rerr := k.read()
		if n > 0 {
			sent.Add(int64(n))
			err = s.sendFramed((*bp)[:frameHeaderLen+n])
		}
		if bp != nil {
			relayBufs.Put(bp)
		}
		if err != nil {
			break
		}
		if rerr == io.EOF {
			err = s.closeSend()
			break
		}
		if rerr != nil {
			if serr := s.sendState(); serr != nil {
				err = serr // our own interrupt: the stream ended
			} else {
				err = fmt.Errorf("reading from the application: %w", rerr)
				s.abort(err, http2.ErrCodeConnect)
			}
			break
		}
	}
	if errors.Is(err, errPeerStopped) {
		err = nil
	}
	s.mu.Lock()
	for !s.recvDoneLocked() {
		s.cond.Wait()
	}
	if err == nil {
		err = s.err
	}
	s.mu.Unlock()
	return err
}

// sendState returns why the sending direction is over, if it is.
func (s *stream) sendState() error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.sendErr
}

// write is Write for streams used as an io.Writer.
func (s *stream) write(p []byte) (int, error) {
	if err := s.sendCopy(p, 0); err != nil {
		if err == errSendClosed {
			return 0, err
		}
		return 0, err
	}
	return len(p), nil
}
