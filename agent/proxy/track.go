package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// ConnInfo is a snapshot of one connection.
type ConnInfo struct {
	ID   uint64
	Flow Flow
	// Start is when the agent accepted the connection; Setup how long it
	// took until bytes could flow (resolution, policy, dial or tunnel).
	Start time.Time
	Setup time.Duration
	// Sent counts bytes from the connection's source towards its
	// destination, Received the other way, as far as copied so far.
	Sent, Received int64
	// Bytes reads the live counters behind Sent and Received while the
	// connection is open; it stays valid (and frozen) after it closes.
	Bytes ByteCounters `json:"-"`
}

// ByteCounters is a read-only handle on one connection's live byte
// counters. Unlike the other ConnInfo fields, an Observer may keep it (it
// is comparable, a map key for the connection) and read it from any
// goroutine: that is how metrics report long-lived connections before they
// close, without the data path doing anything but its atomic adds.
type ByteCounters struct{ c *conn }

// Load returns the bytes copied so far, source to destination (sent) and
// back (received); zeros for the zero ByteCounters.
func (b ByteCounters) Load() (sent, received int64) {
	if b.c == nil {
		return 0, 0
	}
	return b.c.sent.Load(), b.c.recv.Load()
}

// Close reasons passed to Observer.Closed.
const (
	CloseEOF    = "eof"    // both sides closed cleanly
	CloseReset  = "reset"  // a side reset, or a copy failed
	ClosePolicy = "policy" // denied when policy was re-evaluated
	CloseAdmin  = "closed" // closed by CloseConnections
	CloseDrain  = "drain"  // still open at the drain deadline
	CloseStop   = "stop"   // the proxy was closed
)

// Observer learns about every connection, for metrics and access logs.
// Methods are called on connection goroutines: they must be fast, must not
// block, and must not keep the pointers (ConnInfo.Bytes may be kept).
type Observer interface {
	// Opened: the connection is established and tracked.
	Opened(c *ConnInfo)
	// Closed: an opened connection ended, for reason (Close*).
	Closed(c *ConnInfo, reason string)
	// Refused: a connection was refused or failed before it opened (policy
	// denial, no endpoint, dial or tunnel failure); f may be partly filled.
	Refused(f *Flow, r *Refusal)
}

type nopObserver struct{}

func (nopObserver) Opened(*ConnInfo)         {}
func (nopObserver) Closed(*ConnInfo, string) {}
func (nopObserver) Refused(*Flow, *Refusal)  {}

type conn struct {
	id         uint64
	flow       Flow
	start      time.Time
	setup      time.Duration
	sent, recv atomic.Int64
	failed     atomic.Bool            // a copy direction ended in error
	cut        atomic.Pointer[string] // why the agent killed it, if it did
	kill       func()                 // resets both ends; safe to call more than once
}

func (c *conn) info() ConnInfo {
	return ConnInfo{ID: c.id, Flow: c.flow, Start: c.start, Setup: c.setup, Sent: c.sent.Load(), Received: c.recv.Load(), Bytes: ByteCounters{c}}
}

func (c *conn) closeReason() string {
	if r := c.cut.Load(); r != nil {
		return *r
	}
	if c.failed.Load() {
		return CloseReset
	}
	return CloseEOF
}

type tracker struct {
	obs    Observer
	mu     sync.Mutex
	conns  map[uint64]*conn
	nextID uint64
	empty  chan struct{} // closed and replaced when conns becomes empty; nil when empty
	closed bool          // closeAll was called: kill what is added
}

// add tracks c. After closeAll, c is killed at once (it was set up while
// the proxy closed), so that Close never waits for a live connection.
func (t *tracker) add(c *conn) {
	c.setup = time.Since(c.start)
	t.mu.Lock()
	closed := t.closed
	t.addLocked(c)
	t.mu.Unlock()
	info := c.info()
	t.obs.Opened(&info)
	if closed {
		reason := CloseStop
		c.cut.CompareAndSwap(nil, &reason)
		c.kill()
	}
}

func (t *tracker) addLocked(c *conn) {
	if t.conns == nil {
		t.conns = make(map[uint64]*conn)
	}
	t.nextID++
	c.id = t.nextID
	t.conns[c.id] = c
	if t.empty == nil {
		t.empty = make(chan struct{})
	}
}

func (t *tracker) remove(c *conn) {
	t.mu.Lock()
	delete(t.conns, c.id)
	if len(t.conns) == 0 && t.empty != nil {
		close(t.empty)
		t.empty = nil
	}
	t.mu.Unlock()
	info := c.info()
	t.obs.Closed(&info, c.closeReason())
}

func (t *tracker) list() []ConnInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]ConnInfo, 0, len(t.conns))
	for _, c := range t.conns {
		out = append(out, c.info())
	}
	return out
}

func (t *tracker) kill(match func(*conn) bool, reason string) int {
	t.mu.Lock()
	var victims []*conn
	for _, c := range t.conns {
		if match(c) {
			victims = append(victims, c)
		}
	}
	t.mu.Unlock()
	for _, c := range victims {
		c.cut.CompareAndSwap(nil, &reason)
		c.kill()
	}
	return len(victims)
}

// closeAll kills every connection, now and later.
func (t *tracker) closeAll() int {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	return t.kill(func(*conn) bool { return true }, CloseStop)
}

// wait returns when no connection is tracked or ctx is done.
func (t *tracker) wait(ctx context.Context) error {
	for {
		t.mu.Lock()
		ch := t.empty
		t.mu.Unlock()
		if ch == nil {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
