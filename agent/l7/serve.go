package l7

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// ServeConn serves HTTP on one connection that Detect (or appProtocol)
// found to be HTTP/1.x or HTTP/2 with prior knowledge, with net/http's
// server: the agent parses nothing itself. It
// returns when the client closes the connection, the connection fails, or
// ctx ends (then the connection is closed). Requests on the connection are
// handled concurrently as net/http does; a handler that denies a request
// (403) leaves the connection open for the next one.
//
// idle bounds how long a connection may wait for its next request (0: no
// bound beyond ctx).
func ServeConn(ctx context.Context, c net.Conn, p Protocol, h http.Handler, idle time.Duration) {
	base := &http.Server{
		Handler:           h,
		IdleTimeout:       idle,
		ReadHeaderTimeout: ReadHeaderTimeout,
		// Errors from malformed requests are the client's, per request;
		// the agent's logger is not the place for them.
		ErrorLog: nil,
	}
	// net/http serves HTTP/1.x and, with UnencryptedHTTP2, HTTP/2 with
	// prior knowledge (it recognises the preface itself), so both
	// protocols take the same path.
	base.Protocols = new(http.Protocols)
	base.Protocols.SetHTTP1(p != H2C && p != GRPC)
	base.Protocols.SetUnencryptedHTTP2(true)
	ln := newOneConnListener(c)
	base.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateClosed || s == http.StateHijacked {
			ln.finish()
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = base.Serve(ln) // returns once the listener is closed
	}()
	select {
	case <-ln.finished:
	case <-ctx.Done():
	}
	// Close stops the server and closes the connection if it is still
	// open; a hijacked connection (an upgrade) belongs to its handler.
	_ = base.Close()
	<-done
	if c := ln.take(); c != nil {
		c.Close() // ctx ended before the server took it
	}
}

// oneConnListener hands out one connection, then blocks in Accept until
// it is closed.
type oneConnListener struct {
	mu       sync.Mutex
	c        net.Conn
	closed   chan struct{}
	finished chan struct{}
	once     sync.Once
	fin      sync.Once
}

func newOneConnListener(c net.Conn) *oneConnListener {
	return &oneConnListener{c: c, closed: make(chan struct{}), finished: make(chan struct{})}
}

func (l *oneConnListener) take() net.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.c
	l.c = nil
	return c
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	if c := l.take(); c != nil {
		return c, nil
	}
	<-l.closed
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *oneConnListener) finish() { l.fin.Do(func() { close(l.finished) }) }

func (l *oneConnListener) Addr() net.Addr {
	return &net.TCPAddr{}
}
