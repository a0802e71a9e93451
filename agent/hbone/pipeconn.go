package hbone

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// StreamConn is a tunnel stream used as a net.Conn, for a user that
// parses the stream itself in the agent (the L7 layer's net/http server
// and transport) rather than relaying it to a socket. It reads and writes
// the stream directly: received DATA is buffered by the read loop within
// the stream's window and copied out by Read, and Write sends DATA frames
// from the calling goroutine, so no socket, copy goroutine or system call
// stands between the tunnel and the parser.
//
// Deadlines work as on a socket: a Read or Write waiting when its
// deadline passes returns an error that is a timeout
// (os.ErrDeadlineExceeded), and a deadline in the past makes them return
// at once, which net/http relies on to stop its background reads. A
// Write's deadline bounds the wait for flow-control window, not a write
// to the TLS connection already under way (the connection's own timeouts
// bound that). Close unblocks a waiting Read or Write with net.ErrClosed.
// CloseWrite half-closes (END_STREAM), and Close is a clean close: it
// sends END_STREAM if it was not sent yet, and what the peer still sends
// is dropped. A Tunnel's Close stops a peer that is still sending with
// RST_STREAM(NO_ERROR), as the end of its handler does; a pool Stream's
// Close returns the stream's slot at once but leaves the stream open
// until the peer's END_STREAM (which a peer that reads to the end sends
// once it sees ours), resetting it only if that takes longer than 10 s:
// the usual close sends no RST_STREAM, which peers count against floods.
// Reset ends the stream with RST_STREAM(CONNECT_ERROR) instead, as a
// reset socket would.
//
// One goroutine may Read while another Writes; Close, Reset and the
// deadline setters may be called from any goroutine.
type StreamConn struct {
	s             *stream
	local, remote net.Addr
	// read and written count the bytes Read returned and Write sent (nil:
	// not counted).
	read, written *atomic.Int64
	// client is the pool's Stream (nil for a Tunnel).
	client *Stream
	once   sync.Once
	failed atomic.Bool
}

var _ net.Conn = (*StreamConn)(nil)

// Conn returns the tunnel as a net.Conn, after Accept; see StreamConn.
// local and remote are what LocalAddr and RemoteAddr return; read counts
// the bytes received from the client, written those sent to it (either
// may be nil). Conn replaces Read, Write, CloseWrite and Relay. The
// handler must still close the StreamConn before it returns.
func (t *Tunnel) Conn(local, remote net.Addr, read, written *atomic.Int64) (*StreamConn, error) {
	if t.state != tunnelAccepted {
		return nil, errors.New("hbone: Conn before Accept")
	}
	return &StreamConn{s: t.s, local: local, remote: remote, read: read, written: written}, nil
}

// Conn returns the stream as a net.Conn; see StreamConn. local and remote
// are what LocalAddr and RemoteAddr return; read counts the bytes received
// from the peer, written those sent to it (either may be nil). Closing the
// StreamConn returns the stream's slot to the pool. Conn replaces Read, Write,
// CloseWrite and Relay, and cannot be used with ConnectRequest.Body.
func (s *Stream) Conn(local, remote net.Addr, read, written *atomic.Int64) (*StreamConn, error) {
	if s.body != nil {
		return nil, errBodySupplied
	}
	return &StreamConn{s: s.s, local: local, remote: remote, read: read, written: written, client: s}, nil
}

// Read reads what the peer sent; io.EOF means the peer half-closed.
func (c *StreamConn) Read(p []byte) (int, error) {
	n, err := c.s.read(p)
	if c.read != nil && n > 0 {
		c.read.Add(int64(n))
	}
	return n, err
}

// Write sends p to the peer.
func (c *StreamConn) Write(p []byte) (int, error) {
	n, err := c.s.write(p)
	if c.written != nil && n > 0 {
		c.written.Add(int64(n))
	}
	if errors.Is(err, errSendClosed) && c.closed() {
		err = net.ErrClosed
	}
	return n, err
}

// CloseWrite half-closes the stream (END_STREAM); the peer can go on
// sending.
func (c *StreamConn) CloseWrite() error { return c.s.closeSend() }

// Close ends the stream cleanly (see StreamConn) and unblocks a waiting
// Read or Write. It returns nil.
func (c *StreamConn) Close() error {
	c.once.Do(func() {
		s := c.s
		s.mu.Lock()
		if s.err != nil {
			c.failed.Store(true) // reset by the peer, Reset, or the connection failed
		}
		s.rclosed = true
		// Nothing will read what is buffered or still comes: give it back
		// to the connection's window (the stream's own ends with it).
		s.discard = true
		dropped := s.buffered()
		s.rbuf, s.roff = nil, 0
		s.rdl.stop()
		s.cond.Broadcast()
		s.mu.Unlock()
		_ = s.closeSend()
		s.c.mu.Lock()
		s.wdl.stop()
		s.c.flowCond.Broadcast() // a Write waiting for window sees the END_STREAM
		s.c.mu.Unlock()
		if dropped > 0 {
			s.c.consumed(dropped, true)
		}
		if c.client != nil {
			c.client.closeAfterPeer()
		} else {
			s.stopPeer() // the handler's end would do it too
		}
	})
	return nil
}

func (c *StreamConn) closed() bool {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	return c.s.rclosed
}

// Reset ends the stream with RST_STREAM(CONNECT_ERROR) at once, failing a
// waiting Read or Write; the peer sees a reset, not a clean end. Close
// must still be called.
func (c *StreamConn) Reset() {
	c.s.abort(errResetLocally, http2.ErrCodeConnect)
}

var errResetLocally = errors.New("hbone: stream reset locally")

// Failed reports, after Close, whether the stream had ended with an error
// before Close: reset by either side, or its connection failed.
func (c *StreamConn) Failed() bool { return c.failed.Load() }

// LocalAddr returns the local address given to Conn.
func (c *StreamConn) LocalAddr() net.Addr { return c.local }

// RemoteAddr returns the remote address given to Conn.
func (c *StreamConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets both deadlines.
func (c *StreamConn) SetDeadline(t time.Time) error {
	_ = c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline sets the deadline of Read; the zero time clears it.
func (c *StreamConn) SetReadDeadline(t time.Time) error {
	s := c.s
	s.mu.Lock()
	if s.rdl == nil {
		s.rdl = &deadline{mu: &s.mu, wake: s.cond.Broadcast}
	}
	s.rdl.set(t)
	s.mu.Unlock()
	return nil
}

// SetWriteDeadline sets the deadline of Write's wait for flow-control
// window; the zero time clears it.
func (c *StreamConn) SetWriteDeadline(t time.Time) error {
	s := c.s
	s.c.mu.Lock()
	if s.wdl == nil {
		s.wdl = &deadline{mu: &s.c.mu, wake: s.c.flowCond.Broadcast}
	}
	s.wdl.set(t)
	s.c.mu.Unlock()
	return nil
}

// deadline is one direction's deadline of a StreamConn. It is guarded by
// mu, the lock of the condition its waiters wait on; wake (called with mu
// held) wakes them when the deadline passes.
type deadline struct {
	mu      sync.Locker
	wake    func()
	when    time.Time
	timer   *time.Timer
	expired bool
}

// set arms d for t (zero: no deadline). Called with d.mu held.
func (d *deadline) set(t time.Time) {
	d.when = t
	d.expired = false
	if t.IsZero() {
		if d.timer != nil {
			d.timer.Stop()
		}
		return
	}
	wait := time.Until(t)
	if wait <= 0 {
		if d.timer != nil {
			d.timer.Stop()
		}
		d.expired = true
		d.wake()
		return
	}
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.fire)
		return
	}
	d.timer.Reset(wait)
}

// fire runs on the timer's goroutine. A timer that fires after the
// deadline was moved or cleared finds when changed and does nothing (or
// waits on for a deadline that moved later).
func (d *deadline) fire() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.when.IsZero() || d.expired {
		return
	}
	if wait := time.Until(d.when); wait > 0 {
		d.timer.Reset(wait)
		return
	}
	d.expired = true
	d.wake()
}

// passed reports whether the deadline has passed; nil-safe. Called with
// d.mu held.
func (d *deadline) passed() bool { return d != nil && d.expired }

// stop stops d's timer; nil-safe. Called with d.mu held.
func (d *deadline) stop() {
	if d == nil {
		return
	}
	d.when = time.Time{}
	if d.timer != nil {
		d.timer.Stop()
	}
}

// errDeadline is what a Read or Write whose deadline passed returns: a
// timeout, as from a socket.
var errDeadline = os.ErrDeadlineExceeded
