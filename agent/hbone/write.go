package hbone

import (
	"fmt"

	"golang.org/x/net/http2"
)

// The write side of a connection. There is no writer goroutine: the
// goroutine that has bytes to send encodes its frames and writes them to
// the TLS connection itself, under c.wmu. Frames that other goroutines
// produce while a write is in progress are appended to c.pend, and the
// writing goroutine ("the flusher") sends them too before it lets go, so
// that frames waiting together leave in one TLS write and, through
// batchConn, one write(2) (group commit).
//
// The read loop never becomes the flusher: if it queues a frame (a
// WINDOW_UPDATE, a PING or SETTINGS ack, a RST_STREAM) while nobody is
// flushing, it asks the connection's keeper goroutine to flush. A read
// loop blocked on a full TCP send buffer would stop reading, and two peers
// doing that to each other would deadlock.

// lockWriter takes c.wmu, waiting while the pending batch is full. It
// returns with c.wmu held, or with an error and c.wmu released.
func (c *conn) lockWriter(wait bool) error {
	c.wmu.Lock()
	for wait && c.flushing && len(c.pend.b) >= maxPending && c.werr == nil {
		c.wcond.Wait()
	}
	if c.werr != nil {
		err := c.werr
		c.wmu.Unlock()
		return err
	}
	return nil
}

// commitLocked is called with c.wmu held after frames were appended to
// c.pend; it releases c.wmu. If nobody is flushing, the caller flushes
// when inline, else the keeper does.
func (c *conn) commitLocked(inline bool) error {
	if c.flushing || len(c.pend.b) == 0 {
		err := c.werr
		c.wmu.Unlock()
		return err
	}
	if !inline {
		c.wmu.Unlock()
		select {
		case c.flushReq <- struct{}{}:
		default:
		}
		return nil
	}
	c.flushing = true
	return c.flushLoop(nil)
}

// flushLoop writes first (if any) and then the pending batches until none
// is left. It is called with c.wmu held and c.flushing set, and releases
// c.wmu.
func (c *conn) flushLoop(first []byte) error {
	var err error
	if first != nil {
		c.wmu.Unlock()
		err = c.writeOut(first)
		c.wmu.Lock()
	}
	return c.flushRest(err)
}

// flushRest is the rest of flushLoop: unless err (the first write's
// result) is set, it writes the pending batches; then it ends the flush.
// Called with c.wmu held and c.flushing set; releases c.wmu.
func (c *conn) flushRest(err error) error {
	for err == nil && len(c.pend.b) > 0 {
		out := c.pend.b
		c.pend.b = c.spare[:0]
		c.spare = nil
		c.wcond.Broadcast() // room in pend again
		c.wmu.Unlock()
		err = c.writeOut(out)
		c.wmu.Lock()
		if cap(out) <= keepBuf {
			c.spare = out[:0]
		}
	}
	c.flushing = false
	if err != nil && c.werr == nil {
		c.werr = err
	}
	if cap(c.pend.b) > keepBuf && len(c.pend.b) == 0 {
		c.pend.b = nil
	}
	c.wcond.Broadcast()
	c.wmu.Unlock()
	if err != nil {
		c.timeoutCheck(err, "peer stopped reading")
		c.fail(fmt.Errorf("writing to HBONE peer: %w", err))
	}
	// Our own result: if another goroutine failed the connection while
	// we wrote, what we wrote still went out.
	return err
}

// writeOut sends plaintext frames through TLS as one batch of records.
func (c *conn) writeOut(b []byte) error {
	c.bc.start()
	_, err := c.tc.Write(b)
	if ferr := c.bc.flush(); err == nil {
		err = ferr
	}
	return err
}

// flushInline is flushLoop for a caller that must not wait for the
// socket: the relay, inside its read callback on the application socket
// (see sendInline). It is called with c.wmu held and c.flushing set, and
// writes first with one non-blocking write(2). It returns true when all of
// it went out and nothing else was queued meanwhile; c.flushing is then
// cleared and c.wmu released. Otherwise c.flushing stays set for the
// caller, who must call finishFlush once it may block.
func (c *conn) flushInline(first []byte) bool {
	c.wmu.Unlock()
	c.bc.start()
	if _, err := c.tc.Write(first); err != nil {
		c.inlineErr = err
		return false
	}
	if done, err := c.bc.flushTry(); !done || err != nil {
		c.inlineErr = err
		return false
	}
	c.wmu.Lock()
	if len(c.pend.b) > 0 {
		c.wmu.Unlock()
		return false
	}
	c.flushing = false
	c.wcond.Broadcast()
	c.wmu.Unlock()
	return true
}

// finishFlush completes what flushInline left: the rest of the batch, then
// what was queued meanwhile. c.flushing is set and c.wmu is not held.
func (c *conn) finishFlush() error {
	err := c.bc.flush()
	c.wmu.Lock()
	if c.inlineErr != nil {
		err, c.inlineErr = c.inlineErr, nil
	}
	return c.flushRest(err)
}

// writeFramed sends buf, one complete frame (or several), from the
// calling goroutine. When nothing is queued it is written without a copy.
func (c *conn) writeFramed(buf []byte) error {
	if err := c.lockWriter(true); err != nil {
		return err
	}
	if c.flushing || len(c.pend.b) > 0 {
		c.pend.b = append(c.pend.b, buf...)
		return c.commitLocked(true)
	}
	c.flushing = true
	return c.flushLoop(buf)
}

// writeControl appends one control frame, built by fn with the Framer,
// and commits it. Control frames never wait for room.
func (c *conn) writeControl(inline bool, fn func(fw *http2.Framer) error) error {
	if err := c.lockWriter(false); err != nil {
		return err
	}
	if err := fn(c.fw); err != nil {
		c.wmu.Unlock()
		return err
	}
	return c.commitLocked(inline)
}

func (c *conn) writeWindowUpdate(inline bool, streamID, inc uint32) {
	if inc == 0 {
		return
	}
	if c.lockWriter(false) != nil {
		return
	}
	_ = c.fw.WriteWindowUpdate(streamID, inc)
	_ = c.commitLocked(inline)
}

func (c *conn) writeRST(inline bool, streamID uint32, code http2.ErrCode) {
	c.noteReset(streamID)
	if c.lockWriter(false) != nil {
		return
	}
	_ = c.fw.WriteRSTStream(streamID, code)
	_ = c.commitLocked(inline)
}

// writeEnd sends an empty DATA frame with END_STREAM.
func (c *conn) writeEnd(streamID uint32) error {
	var h [frameHeaderLen]byte
	putDataHeader(h[:], 0, streamID, true)
	if err := c.lockWriter(false); err != nil {
		return err
	}
	c.pend.b = append(c.pend.b, h[:]...)
	return c.commitLocked(true)
}
