package hbone

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
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

	// tryWrite's writer; only one goroutine writes to a sink at a time.
	nbw nbWriter

	// Reads: rb is a relay buffer taken from the pool only while there is
	// data to read, so an idle stream holds none; rn, rerr and rfn carry
	// the read callback's results so that a read allocates nothing.
	rb   *[]byte
	rn   int
	rerr error
	rfn  func(fd uintptr) bool
	// Sending from inside the read callback (read): the stream, the
	// count of bytes read, and whether a flush is owed.
	s       *stream
	sent    *atomic.Int64
	owe     bool
	dr      drainReader
	armed   bool        // a read deadline confirmAfter from the last drained read is set
	confirm bool        // the next read is a plain one (see read)
	stopped atomic.Bool // interrupted: the read deadline is in the past for good
}

func newSink(app net.Conn, n *atomic.Int64) *sink {
	k := &sink{conn: app, n: n, rc: rawConn(app)}
	k.rfn = k.doRead
	return k
}

// read reads the next chunk from the application into a pooled relay
// buffer, after the frame header room; release the buffer with done. On a
// socket it waits for readability before it takes a buffer.
//
// On a socket with a stream to send to (k.s), read also sends what it
// reads, inside the read callback, whenever that needs no waiting
// (stream.sendInline), and keeps reading; once a read says the socket is
// drained (drainReader), it waits for the next edge of readability instead
// of reading again only to hear EAGAIN. It
// returns with a chunk (n > 0) only when that chunk must still be sent the
// blocking way, and with k.owe set when a flush must be finished.
func (k *sink) read() (*[]byte, int, error) {
	if k.rc == nil {
		bp := relayBufs.Get().(*[]byte)
		n, err := k.conn.Read((*bp)[frameHeaderLen:])
		return bp, n, err
	}
	for {
		k.rn, k.rerr = 0, nil
		err := k.rc.Read(k.rfn)
		if err != nil && k.armed && !k.stopped.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
			// A quiet second after a drained read: read once more, to
			// find a reset that came with the data (see drainReader).
			k.armed = false
			_ = k.conn.SetReadDeadline(time.Time{})
			if k.stopped.Load() {
				_ = k.conn.SetReadDeadline(longAgo)
			}
			k.confirm = true
			continue
		}
		if err != nil {
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
}

// confirmAfter is how long the relay waits, after a drained read, before
// it reads the application socket once more to look for a reset that came
// with the last data.
const confirmAfter = time.Second

func (k *sink) doRead(fd uintptr) bool {
	for {
		if k.rb == nil {
			k.rb = relayBufs.Get().(*[]byte)
		}
		var n int
		var eof, drained bool
		var err error
		if k.confirm {
			// A plain read, to hear EAGAIN or the pending error.
			k.confirm = false
			n, err = sysRead(int(fd), (*k.rb)[frameHeaderLen:])
			if err == nil && n == 0 {
				eof = true
			}
		} else {
			n, eof, drained, err = k.dr.read(int(fd), (*k.rb)[frameHeaderLen:])
		}
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			relayBufs.Put(k.rb)
			k.rb = nil
			return false // wait until readable
		case err != nil:
			k.rerr = err
			return true
		case eof:
			k.rerr = io.EOF
		}
		k.rn = n
		if n == 0 || k.s == nil {
			return true
		}
		ok, owe := k.s.sendInline((*k.rb)[:frameHeaderLen+n])
		if !ok {
			return true // send it the blocking way
		}
		k.sent.Add(int64(n))
		k.rn = 0
		if owe {
			k.owe = true
			return true
		}
		if eof {
			return true
		}
		if drained {
			// Wait for the next edge, not for EAGAIN; but look again
			// after a quiet second (see drainReader).
			relayBufs.Put(k.rb)
			k.rb = nil
			k.armed = true
			_ = k.conn.SetReadDeadline(time.Now().Add(confirmAfter))
			if k.stopped.Load() {
				_ = k.conn.SetReadDeadline(longAgo)
			}
			return false
		}
	}
}

// tryWrite writes as much of p as the socket takes without blocking.
func (k *sink) tryWrite(p []byte) (int, error) {
	if k.rc == nil {
		return 0, nil
	}
	n, err := k.nbw.write(k.rc, p)
	k.n.Add(int64(n))
	return n, err
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
	k.stopped.Store(true)
	_ = k.conn.SetReadDeadline(longAgo)
	_ = k.conn.SetWriteDeadline(longAgo)
}

func (k *sink) interruptRead() {
	k.stopped.Store(true)
	_ = k.conn.SetReadDeadline(longAgo)
}

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

	k.s, k.sent = s, sent
	var err error
	for {
		bp, n, rerr := k.read()
		if k.owe {
			k.owe = false
			err = s.c.finishFlush()
		}
		if n > 0 && err == nil {
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
