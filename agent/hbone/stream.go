package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// errPeerStopped ends the sending direction of a stream whose peer ended
// its own direction and then reset the stream with NO_ERROR (an HTTP/2
// server that does not want the rest of the request, RFC 9113 §8.1). What
// the peer sent is complete; what we still had to send is not wanted.
var errPeerStopped = errors.New("hbone: peer stopped reading the stream")

// stream is one CONNECT stream on a conn, either end.
//
// Receiving: the read loop hands each DATA payload to onData. In pipe
// mode (Read) it is buffered for the reader. In relay mode (a sink, the
// application's socket) the read loop writes it to the socket itself with
// a non-blocking write; only what the socket does not take at once is
// buffered, and a drainer goroutine, started for that and ending when the
// buffer is empty, writes it with blocking writes. Either way the buffer
// is bounded by the stream's receive window.
//
// Sending: one goroutine at a time (the relay, or the user of Write)
// takes flow-control window under c.mu and writes DATA frames itself.
type stream struct {
	c  *conn
	id uint32

	// Guarded by c.mu.
	sendWin int64
	sendErr error     // the sending direction is over
	wdl     *deadline // StreamConn: Write's deadline

	mu      sync.Mutex
	cond    sync.Cond
	rbuf    []byte // received, not yet delivered: rbuf[roff:]
	roff    int
	recvWin int64 // what the peer may still send
	unacked int64 // delivered, not yet returned in WINDOW_UPDATE
	recvEnd bool  // the peer sent END_STREAM
	sentEnd bool  // we sent END_STREAM
	err     error // reset by either side, or the connection failed
	sink    *sink
	writing bool // a drainer is writing rbuf to sink
	sinkEOF bool // the peer's END_STREAM was passed on to sink
	// StreamConn: Read's deadline, and whether Close was called.
	rdl     *deadline
	rclosed bool

	// Client: the response. respCh is closed when it arrived or the
	// stream failed first.
	status int
	respCh chan struct{}

	// Server.
	discard bool // answered without a handler; received data is dropped
	ctx     context.Context
	cancel  context.CancelFunc
}

func newStream(c *conn, id uint32) *stream {
	s := &stream{c: c, id: id, recvWin: int64(c.cfg.flow.StreamWindow)}
	s.cond.L = &s.mu
	return s
}

func (s *stream) buffered() int { return len(s.rbuf) - s.roff }

// creditLocked counts n delivered bytes and returns the WINDOW_UPDATE
// increment to send for the stream, if one is due.
func (s *stream) creditLocked(n int) uint32 {
	s.unacked += int64(n)
	if s.recvEnd || s.err != nil {
		s.unacked = 0
		return 0
	}
	if s.unacked < int64(s.c.cfg.flow.StreamWindow)/2 {
		return 0
	}
	inc := s.unacked
	s.unacked = 0
	s.recvWin += inc
	return uint32(inc)
}

// appendLocked buffers p, compacting the buffer first when no drainer is
// writing from it.
func (s *stream) appendLocked(p []byte) {
	if s.roff > 0 && !s.writing && cap(s.rbuf)-len(s.rbuf) < len(p) {
		n := copy(s.rbuf, s.rbuf[s.roff:])
		s.rbuf = s.rbuf[:n]
		s.roff = 0
	}
	s.rbuf = append(s.rbuf, p...)
}

// consumeLocked drops n delivered bytes from the head of the buffer.
func (s *stream) consumeLocked(n int) {
	s.roff += n
	if s.roff == len(s.rbuf) {
		if cap(s.rbuf) > keepBuf {
			s.rbuf = nil
		} else {
			s.rbuf = s.rbuf[:0]
		}
		s.roff = 0
	}
}

// onData is called by the read loop with a DATA frame's payload; flowLen
// counts padding too. It never blocks.
func (s *stream) onData(data []byte, flowLen int, end bool) {
	c := s.c
	s.mu.Lock()
	if s.recvEnd || s.err != nil || (!c.cfg.server && s.status == 0) {
		closed := s.recvEnd && s.err == nil
		early := !closed && s.err == nil
		s.mu.Unlock()
		c.consumed(flowLen, false)
		switch {
		case closed:
			c.resetStream(s.id, http2.ErrCodeStreamClosed)
		case early:
			c.resetStream(s.id, http2.ErrCodeProtocol) // DATA before the response
		}
		return
	}
	if int64(flowLen) > s.recvWin {
		s.mu.Unlock()
		c.consumed(flowLen, false)
		c.resetStream(s.id, http2.ErrCodeFlowControl)
		return
	}
	s.recvWin -= int64(flowLen)
	took := flowLen - len(data) // padding is consumed at once
	if s.discard {
		took, data = flowLen, nil
	}
	var werr error
	if len(data) > 0 && s.sink != nil && !s.writing && s.buffered() == 0 {
		var n int
		n, werr = s.sink.tryWrite(data)
		took += n
		data = data[n:]
	}
	if werr != nil {
		s.mu.Unlock()
		c.consumed(flowLen, false)
		s.abort(fmt.Errorf("writing to the application: %w", werr), http2.ErrCodeConnect)
		return
	}
	if len(data) > 0 {
		s.appendLocked(data)
	}
	if end {
		s.recvEnd = true
	}
	var closeSink, startDrain bool
	if s.sink != nil && !s.writing {
		switch {
		case s.buffered() > 0:
			s.writing, startDrain = true, true
		case s.recvEnd && !s.sinkEOF:
			// writing keeps the relay waiting until the FIN is out.
			s.sinkEOF, s.writing, closeSink = true, true, true
		}
	}
	inc := s.creditLocked(took)
	done := s.recvEnd && s.sentEnd
	sk := s.sink
	s.cond.Broadcast()
	s.mu.Unlock()
	if closeSink {
		sk.closeWrite()
		s.mu.Lock()
		s.writing = false
		s.cond.Broadcast()
		s.mu.Unlock()
	}
	if startDrain {
		c.wg.Add(1)
		go s.drain()
	}
	if inc > 0 {
		c.writeWindowUpdate(false, s.id, inc)
	}
	if took > 0 {
		c.consumed(took, false)
	}
	if done {
		c.removeStream(s)
	}
}

// drain writes buffered data to the sink with blocking writes until the
// buffer is empty. It runs in its own goroutine, owned by the conn.
func (s *stream) drain() {
	c := s.c
	defer c.wg.Done()
	for {
		s.mu.Lock()
		if s.err != nil {
			left := s.buffered()
			s.rbuf, s.roff = nil, 0
			s.writing = false
			s.cond.Broadcast()
			s.mu.Unlock()
			c.consumed(left, true)
			return
		}
		if s.buffered() == 0 {
			eof := s.recvEnd && !s.sinkEOF
			s.sinkEOF = s.sinkEOF || eof
			s.mu.Unlock()
			if eof {
				s.sink.closeWrite()
			}
			s.mu.Lock()
			s.writing = false
			s.cond.Broadcast()
			s.mu.Unlock()
			return
		}
		chunk := s.rbuf[s.roff:]
		s.mu.Unlock()
		n, err := s.sink.write(chunk)
		s.mu.Lock()
		s.consumeLocked(n)
		inc := s.creditLocked(n)
		s.mu.Unlock()
		if inc > 0 {
			c.writeWindowUpdate(true, s.id, inc)
		}
		c.consumed(n, true)
		if err != nil {
			s.abort(fmt.Errorf("writing to the application: %w", err), http2.ErrCodeConnect)
		}
	}
}

// readKeepBuf is the largest receive buffer a stream read with Read keeps
// once everything in it was read: enough for a request's or response's
// header, so that small messages reuse it.
const readKeepBuf = 4 << 10

// read is Read in pipe mode.
func (s *stream) read(p []byte) (int, error) {
	s.mu.Lock()
	for s.buffered() == 0 && !s.recvEnd && s.err == nil && !s.rclosed && !s.rdl.passed() {
		s.cond.Wait()
	}
	if s.rclosed {
		s.mu.Unlock()
		return 0, net.ErrClosed
	}
	if s.rdl.passed() {
		s.mu.Unlock()
		return 0, errDeadline
	}
	if s.buffered() > 0 && s.err == nil {
		n := copy(p, s.rbuf[s.roff:])
		s.consumeLocked(n)
		if s.buffered() == 0 && cap(s.rbuf) > readKeepBuf {
			// A stream read this way is often idle between messages (a
			// kept-alive L7 tunnel): it keeps no large buffer meanwhile.
			s.rbuf = nil
		}
		inc := s.creditLocked(n)
		s.mu.Unlock()
		if inc > 0 {
			s.c.writeWindowUpdate(true, s.id, inc)
		}
		s.c.consumed(n, true)
		return n, nil
	}
	err := s.err
	s.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return 0, io.EOF
}

// awaitWindow takes up to want bytes of send window, waiting for it.
func (s *stream) awaitWindow(want int) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if s.sendErr != nil {
			return 0, s.sendErr
		}
		if c.closed {
			return 0, fmt.Errorf("%w: %w", errConnClosed, c.err)
		}
		if s.wdl.passed() {
			return 0, errDeadline
		}
		n := min(int64(want), s.sendWin, c.sendWin, int64(c.peerMaxFrame))
		if n > 0 {
			s.sendWin -= n
			c.sendWin -= n
			return int(n), nil
		}
		c.flowCond.Wait()
	}
}

// sendFramed sends buf[9:] as DATA; buf[:9] is room for the frame header,
// so that a payload that fits the window and frame size leaves without a
// copy.
func (s *stream) sendFramed(buf []byte) error {
	p := buf[frameHeaderLen:]
	if len(p) == 0 {
		return nil
	}
	n, err := s.awaitWindow(len(p))
	if err != nil {
		return err
	}
	if n == len(p) {
		putDataHeader(buf, n, s.id, false)
		return s.c.writeFramed(buf)
	}
	return s.sendCopy(p, n)
}

// sendInline sends buf as sendFramed does, but only if nothing has to
// wait: the window is there, and the frame either joins a batch another
// goroutine is writing or leaves in a write(2) the socket takes at once.
// The relay calls it inside its read callback on the application socket,
// where waiting would hold up a Close of that socket. It returns false,
// having sent nothing, when the caller must use sendFramed; and owe when
// the frame is sent but the caller must call c.finishFlush.
func (s *stream) sendInline(buf []byte) (ok, owe bool) {
	c := s.c
	p := buf[frameHeaderLen:]
	n := int64(len(p))
	c.mu.Lock()
	if s.sendErr != nil || c.closed || n > s.sendWin || n > c.sendWin || len(p) > c.peerMaxFrame {
		c.mu.Unlock()
		return false, false
	}
	s.sendWin -= n
	c.sendWin -= n
	c.mu.Unlock()
	putDataHeader(buf, len(p), s.id, false)
	c.wmu.Lock()
	switch {
	case c.werr != nil, !c.flushing && len(c.pend.b) > 0, c.flushing && len(c.pend.b) >= maxPending:
		c.wmu.Unlock()
		c.mu.Lock()
		s.sendWin += n
		c.sendWin += n
		c.flowCond.Broadcast()
		c.mu.Unlock()
		return false, false
	case c.flushing:
		c.pend.b = append(c.pend.b, buf...)
		c.wmu.Unlock()
		return true, false
	}
	c.flushing = true
	return true, !c.flushInline(buf)
}

// sendCopy sends p as DATA frames copied into the pending batch; granted
// is window already taken for the first frame (0: take it here).
func (s *stream) sendCopy(p []byte, granted int) error {
	c := s.c
	for len(p) > 0 {
		n := granted
		granted = 0
		if n == 0 {
			var err error
			if n, err = s.awaitWindow(len(p)); err != nil {
				return err
			}
		}
		if err := c.lockWriter(true); err != nil {
			return err
		}
		var h [frameHeaderLen]byte
		putDataHeader(h[:], n, s.id, false)
		c.pend.b = append(c.pend.b, h[:]...)
		c.pend.b = append(c.pend.b, p[:n]...)
		if err := c.commitLocked(true); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// closeSend sends END_STREAM (a half-close).
func (s *stream) closeSend() error {
	c := s.c
	c.mu.Lock()
	err := s.sendErr
	if err == nil {
		s.sendErr = errSendClosed
	}
	c.mu.Unlock()
	if err != nil {
		if err == errSendClosed {
			return nil
		}
		return err
	}
	if err := c.writeEnd(s.id); err != nil {
		return err
	}
	s.mu.Lock()
	s.sentEnd = true
	done := s.recvEnd && s.err == nil
	s.mu.Unlock()
	if done {
		c.removeStream(s)
	}
	return nil
}

var errSendClosed = errors.New("hbone: write after CloseWrite")

// abort ends the stream with err and sends RST_STREAM with code, unless
// both directions were already over.
func (s *stream) abort(err error, code http2.ErrCode) {
	s.abortWith(err, code, true)
}

// connClosed ends s because its connection closed with err. A stream
// that already received the peer's END_STREAM, and whose own sending is
// over too (or that is read through Read, whose reader only wants what
// was received), keeps what it received: the reader gets the data and
// then EOF, or the drainer writes it to the application and half-closes
// it; only the sending side fails. The peer may close the connection
// right after its last stream's END_STREAM (a drain), before our own
// END_STREAM was recorded as sent, so such a stream can still be listed.
// A relayed stream whose application is still sending is reset, because
// what it sends can no longer arrive; so is every relayed stream when we
// close the connection ourselves (pool or server closed).
func (s *stream) connClosed(err error) {
	c := s.c
	local := errors.Is(err, ErrPoolClosed) || errors.Is(err, errServerClosed)
	c.mu.Lock()
	sendOver := s.sendErr == errSendClosed || s.sendErr == errPeerStopped
	c.mu.Unlock()
	s.mu.Lock()
	keep := s.recvEnd && s.err == nil && (s.sink == nil || !local && (sendOver || s.sentEnd))
	sk := s.sink
	if keep {
		s.cond.Broadcast()
	}
	s.mu.Unlock()
	if !keep {
		s.abortWith(err, http2.ErrCodeCancel, false)
		return
	}
	c.mu.Lock()
	if s.sendErr == nil || s.sendErr == errSendClosed {
		s.sendErr = err
	}
	c.flowCond.Broadcast()
	c.mu.Unlock()
	if sk != nil {
		// The drainer may still be writing; an application that stops
		// reading must not hold the connection's goroutines forever.
		sk.interruptRead()
		_ = sk.conn.SetWriteDeadline(time.Now().Add(drainAfterClose))
	}
	c.removeStream(s)
}

// drainAfterClose bounds how long a relayed stream's drainer may still
// write what it received to the application after the connection closed.
const drainAfterClose = 10 * time.Second

// abortWith ends the stream locally; sendRST says whether to tell the
// peer (not when the peer reset it, or the connection is gone).
func (s *stream) abortWith(err error, code http2.ErrCode, sendRST bool) {
	c := s.c
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	s.err = err
	over := s.sentEnd && s.recvEnd
	dropped := s.buffered()
	if !s.writing {
		s.rbuf, s.roff = nil, 0
	} else {
		dropped = 0 // the drainer returns it
	}
	sk := s.sink
	s.cond.Broadcast()
	if s.respCh != nil && s.status == 0 {
		close(s.respCh)
		s.respCh = nil
	}
	s.mu.Unlock()
	c.mu.Lock()
	if s.sendErr == nil || s.sendErr == errSendClosed {
		s.sendErr = err
	}
	c.flowCond.Broadcast()
	c.mu.Unlock()
	if s.cancel != nil {
		s.cancel()
	}
	if dropped > 0 {
		c.consumed(dropped, false)
	}
	if sendRST && !over {
		c.writeRST(false, s.id, code)
	}
	if sk != nil {
		sk.interrupt()
	}
	c.removeStream(s)
}

// peerReset handles the peer's RST_STREAM.
func (s *stream) peerReset(code http2.ErrCode, err error) {
	s.mu.Lock()
	stopOnly := code == http2.ErrCodeNo && s.recvEnd && s.err == nil
	s.mu.Unlock()
	if stopOnly {
		c := s.c
		c.mu.Lock()
		if s.sendErr == nil || s.sendErr == errSendClosed {
			s.sendErr = errPeerStopped
		}
		c.flowCond.Broadcast()
		c.mu.Unlock()
		s.mu.Lock()
		s.sentEnd = true
		sk := s.sink
		s.cond.Broadcast()
		s.mu.Unlock()
		if sk != nil {
			sk.interruptRead()
		}
		c.removeStream(s)
		return
	}
	s.abortWith(err, code, false)
}

// recvOpen reports whether the peer may still send: neither its
// END_STREAM nor a reset has come.
func (s *stream) recvOpen() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.recvEnd && s.err == nil
}

// recvDone reports whether the receiving direction is over: reset, or the
// peer's END_STREAM was passed on to the sink.
func (s *stream) recvDoneLocked() bool {
	return s.err != nil || (s.recvEnd && s.sinkEOF && !s.writing)
}
