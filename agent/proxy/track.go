package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// ConnInfo is a snapshot of one open connection.
type ConnInfo struct {
	ID    uint64
	Flow  Flow
	Start time.Time
	// Sent counts bytes from the connection's source towards its
	// destination, Received the other way, as far as copied so far.
	Sent, Received int64
}

type conn struct {
	id         uint64
	flow       Flow
	start      time.Time
	sent, recv atomic.Int64
	kill       func() // resets both ends; safe to call more than once
}

func (c *conn) info() ConnInfo {
	return ConnInfo{ID: c.id, Flow: c.flow, Start: c.start, Sent: c.sent.Load(), Received: c.recv.Load()}
}

type tracker struct {
	mu     sync.Mutex
	conns  map[uint64]*conn
	nextID uint64
	empty  chan struct{} // closed and replaced when conns becomes empty; nil when empty
	closed bool          // closeAll was called: kill what is added
}

// add tracks c. After closeAll, c is killed at once (it was set up while
// the proxy closed), so that Close never waits for a live connection.
func (t *tracker) add(c *conn) {
	t.mu.Lock()
	closed := t.closed
	t.addLocked(c)
	t.mu.Unlock()
	if closed {
		c.kill()
	}
}

func (t *tracker) addLocked(c *conn) {
	if t.conns == nil {
		t.conns = make(map[uint64]*conn)
	}
	t.nextID++
	c.id = t.nextID
	c.start = time.Now()
	t.conns[c.id] = c
	if t.empty == nil {
		t.empty = make(chan struct{})
	}
}

func (t *tracker) remove(c *conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.conns, c.id)
	if len(t.conns) == 0 && t.empty != nil {
		close(t.empty)
		t.empty = nil
	}
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

func (t *tracker) kill(match func(*conn) bool) int {
	t.mu.Lock()
	var victims []*conn
	for _, c := range t.conns {
		if match(c) {
			victims = append(victims, c)
		}
	}
	t.mu.Unlock()
	for _, c := range victims {
		c.kill()
	}
	return len(victims)
}

// closeAll kills every connection, now and later.
func (t *tracker) closeAll() int {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	return t.kill(func(*conn) bool { return true })
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
