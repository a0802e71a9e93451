package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// conn is one HTTP/2 connection over mutual TLS, client or server end. It
// owns two goroutines: the read loop, which reads every frame and
// delivers DATA to its stream (straight into the application socket when
// that cannot block, see stream.go), and the keeper, which sends PINGs,
// enforces the idle timeout and flushes frames the read loop queued.
// Everything else runs on the goroutines of the streams' users.
type conn struct {
	cfg    *connConfig
	tc     *tls.Conn
	bc     *batchConn
	peer   spiffeid.ID
	remote netip.AddrPort
	log    *slog.Logger

	// Write side (write.go), guarded by wmu. Lock order: wmu before mu
	// before stream.mu.
	wmu      sync.Mutex
	wcond    sync.Cond
	fw       *http2.Framer
	pend     pendBuf
	spare    []byte
	flushing bool
	werr     error
	// inlineErr is the error flushInline met, for finishFlush; owned by
	// the goroutine that set flushing.
	inlineErr error
	henc      *hpack.Encoder
	hbuf      bytes.Buffer
	nextID    uint32 // client: the next stream ID

	maxOpened atomic.Uint32 // client: the highest stream ID opened

	// Read side, used by the read loop only (read.go).
	fb      frameBuf
	fr      *http2.Framer
	hdec    *hpack.Decoder
	fields  []hpack.HeaderField
	fieldSz int
	hdrBad  bool // the block being decoded exceeded the limits
	block   headerBlock
	budget  floodBudget

	mu             sync.Mutex
	flowCond       sync.Cond // senders waiting for window
	streams        map[uint32]*stream
	reserved       int // client: slots taken by the pool, not yet opened
	handlers       int // server: streams whose handler has not returned
	peerMaxStreams uint32
	peerInitWin    int64
	peerMaxFrame   int
	sendWin        int64 // connection-level send window
	recvWin        int64 // connection-level receive window left
	recvUnacked    int64 // consumed, not yet announced in WINDOW_UPDATE
	lastPeerID     uint32
	// The streams we reset most recently: the peer may still send
	// frames on them, which RFC 9113 §5.1 says to ignore.
	resetIDs   [32]uint32
	resetNext  int
	goAwayRecv bool
	goAwayLast uint32
	goAwaySent bool
	closed     bool
	closing    error // set when a graceful close has begun: its reason
	err        error
	idleSince  time.Time

	frames   atomic.Uint64 // frames read, for dead-peer detection
	done     chan struct{}
	flushReq chan struct{}
	closeReq chan struct{}  // asks the keeper for a graceful close
	wg       sync.WaitGroup // read loop, keeper, drainers, handlers
	ctx      context.Context
	cancel   context.CancelFunc
}

// connConfig is what a Pool or Server gives each of its connections.
type connConfig struct {
	server         bool
	flow           FlowControl
	maxStreams     int // server: concurrent streams accepted per connection
	maxHeaderBytes int
	pingInterval   time.Duration
	pingTimeout    time.Duration
	idleTimeout    time.Duration // server: close after this long without streams
	prefaceTimeout time.Duration // server: preface and first SETTINGS
	log            *slog.Logger
	ctr            *counters
	// serve starts the handler of a validated CONNECT (server).
	serve func(c *conn, s *stream, req *Request)
}

var (
	errConnClosed = errors.New("hbone connection closed")
	// errRefused marks a stream the peer did not process (REFUSED_STREAM
	// or beyond its GOAWAY); a client may retry it on another connection.
	errRefused = errors.New("hbone stream refused by peer before processing")
)

func newConn(ctx context.Context, tc *tls.Conn, bc *batchConn, cfg *connConfig, peer spiffeid.ID, remote netip.AddrPort) *conn {
	c := &conn{
		cfg:            cfg,
		tc:             tc,
		bc:             bc,
		peer:           peer,
		remote:         remote,
		log:            cfg.log,
		streams:        make(map[uint32]*stream),
		peerMaxStreams: DefaultMaxStreams,
		peerInitWin:    65535,
		peerMaxFrame:   16384,
		sendWin:        65535,
		recvWin:        int64(cfg.flow.ConnWindow),
		nextID:         1,
		idleSince:      time.Now(),
		done:           make(chan struct{}),
		flushReq:       make(chan struct{}, 1),
		closeReq:       make(chan struct{}, 1),
	}
	c.ctx, c.cancel = context.WithCancel(ctx)
	c.wcond.L = &c.wmu
	c.flowCond.L = &c.mu
	c.fw = http2.NewFramer(&c.pend, nil)
	bc.releaseIn() // what the handshake left, unless more already came
	bc.stall = cfg.pingTimeout
	c.fb = frameBuf{src: tc, bc: bc, max: int(cfg.flow.MaxFrameSize)}
	c.fr = http2.NewFramer(nil, &c.fb)
	c.fr.SetReuseFrames()
	c.fr.SetMaxReadFrameSize(cfg.flow.MaxFrameSize)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.hdec = hpack.NewDecoder(4096, c.onField)
	c.hdec.SetMaxStringLength(cfg.maxHeaderBytes)
	c.budget.init()
	return c
}

// start writes the connection preface and starts the goroutines.
func (c *conn) start() error {
	if err := c.preface(); err != nil {
		return err
	}
	c.wg.Add(2)
	go c.readLoop()
	go c.keeper()
	return nil
}

// serve runs the read loop in the calling goroutine (which the server
// has for the connection anyway) and returns when every goroutine of the
// connection has ended. The preface must have been sent.
func (c *conn) serve() {
	c.wg.Add(2)
	go c.keeper()
	c.readLoop()
	c.wg.Wait()
}

// preface sends the connection preface: the client's magic string, our
// SETTINGS and the connection window.
func (c *conn) preface() error {
	err := c.writeControl(true, func(fw *http2.Framer) error {
		if !c.cfg.server {
			c.pend.b = append(c.pend.b, http2.ClientPreface...)
		}
		s := []http2.Setting{
			{ID: http2.SettingInitialWindowSize, Val: uint32(c.cfg.flow.StreamWindow)},
			{ID: http2.SettingMaxFrameSize, Val: c.cfg.flow.MaxFrameSize},
			{ID: http2.SettingMaxHeaderListSize, Val: uint32(c.cfg.maxHeaderBytes)},
		}
		if c.cfg.server {
			s = append(s, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: uint32(c.cfg.maxStreams)})
		} else {
			s = append(s, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
		}
		if err := fw.WriteSettings(s...); err != nil {
			return err
		}
		if c.cfg.flow.ConnWindow > 65535 {
			return fw.WriteWindowUpdate(0, uint32(c.cfg.flow.ConnWindow)-65535)
		}
		return nil
	})
	if err != nil {
		c.fail(err)
		return fmt.Errorf("sending HTTP/2 preface: %w", err)
	}
	return nil
}

// fail closes the connection because of err: every open stream is reset.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if c.closing != nil {
		err = c.closing
	}
	c.err = err
	streams := make([]*stream, 0, len(c.streams))
	for _, s := range c.streams {
		streams = append(streams, s)
	}
	c.flowCond.Broadcast()
	c.mu.Unlock()
	c.wmu.Lock()
	if c.werr == nil {
		c.werr = errConnClosed
	}
	c.wcond.Broadcast()
	c.wmu.Unlock()
	_ = c.bc.Conn.Close()
	close(c.done)
	c.cancel()
	for _, s := range streams {
		s.connClosed(fmt.Errorf("%w: %w", errConnClosed, err))
	}
}

// wait waits for every goroutine of the connection.
func (c *conn) wait() { c.wg.Wait() }

// goAway sends GOAWAY so that the peer opens no new streams here; the
// connection closes when its last stream ends.
func (c *conn) goAway(code http2.ErrCode, debug string) {
	c.mu.Lock()
	if c.goAwaySent || c.closed {
		c.mu.Unlock()
		return
	}
	c.goAwaySent = true
	last := c.lastPeerID
	idle := len(c.streams) == 0 && c.handlers == 0
	c.mu.Unlock()
	_ = c.writeControl(true, func(fw *http2.Framer) error {
		return fw.WriteGoAway(last, code, []byte(debug))
	})
	switch {
	case code != http2.ErrCodeNo:
		c.fail(fmt.Errorf("sent GOAWAY (%v)", code))
	case idle:
		c.closeGracefully(fmt.Errorf("closed after GOAWAY (%s)", debug))
	}
}

// lingerTimeout bounds a graceful close: sending what is queued, and
// waiting for the peer to close its side after our FIN.
const lingerTimeout = 2 * time.Second

// closeGracefully closes a connection that has no streams left and will
// get no new ones (GOAWAY sent or received). The keeper sends what is
// still queued, then a FIN, and closes once the peer has closed its side
// too, or after lingerTimeout. Closing at once would lose frames still
// queued (the last DATA and END_STREAM, or the GOAWAY), and closing a
// socket with unread bytes sends a TCP RST, which discards what is still
// in flight.
func (c *conn) closeGracefully(reason error) {
	c.mu.Lock()
	if c.closed || c.closing != nil {
		c.mu.Unlock()
		return
	}
	c.closing = reason
	c.mu.Unlock()
	select {
	case c.closeReq <- struct{}{}:
	default:
	}
}

// linger is the keeper's half of closeGracefully.
func (c *conn) linger() {
	deadline := time.Now().Add(lingerTimeout)
	c.bc.setWriteDeadline(deadline)
	c.wmu.Lock()
	for c.flushing && c.werr == nil {
		c.wcond.Wait()
	}
	if c.werr == nil && len(c.pend.b) > 0 {
		c.flushing = true
		_ = c.flushLoop(nil)
	} else {
		c.wmu.Unlock()
	}
	if cw, ok := c.bc.Conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-c.done: // the read loop saw the peer close
	case <-t.C:
		c.fail(errors.New("peer did not close after GOAWAY"))
	}
}

// usable reports whether the client connection may open another stream,
// and how many it carries (open plus reserved).
func (c *conn) usable(limit int) (load int, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	load = len(c.streams) + c.reserved
	lim := min(limit, int(c.peerMaxStreams))
	return load, !c.closed && !c.goAwayRecv && !c.goAwaySent && load < lim
}

func (c *conn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// keeper sends PINGs to find dead peers, closes idle server connections
// and flushes what the read loop queued.
func (c *conn) keeper() {
	defer c.wg.Done()
	tick := min(c.cfg.pingInterval, c.cfg.pingTimeout)
	if c.cfg.idleTimeout > 0 {
		tick = min(tick, c.cfg.idleTimeout)
	}
	tick = max(tick/2, 10*time.Millisecond)
	t := time.NewTimer(tick)
	defer t.Stop()
	lastFrames := c.frames.Load()
	lastActive := time.Now()
	var pingAt time.Time
	for {
		select {
		case <-c.done:
			return
		case <-c.closeReq:
			c.linger()
			return
		case <-c.flushReq:
			c.wmu.Lock()
			if c.flushing || len(c.pend.b) == 0 {
				c.wmu.Unlock()
				continue
			}
			c.flushing = true
			c.keeperWrite(func() { _ = c.flushLoop(nil) })
		case now := <-t.C:
			t.Reset(tick)
			if err := socketError(c.bc.rc); err != nil {
				c.fail(fmt.Errorf("HBONE connection: %w", err))
				return
			}
			if f := c.frames.Load(); f != lastFrames {
				lastFrames, lastActive, pingAt = f, now, time.Time{}
			}
			switch {
			case !pingAt.IsZero() && now.Sub(pingAt) >= c.cfg.pingTimeout:
				c.cfg.ctr.pingTimeouts.Add(1)
				c.log.Debug("HBONE peer did not answer PING; closing the connection", "src", c.remote.String())
				c.fail(errors.New("peer did not answer PING"))
				return
			case pingAt.IsZero() && now.Sub(lastActive) >= c.cfg.pingInterval:
				pingAt = now
				c.keeperWrite(func() {
					_ = c.writeControl(true, func(fw *http2.Framer) error {
						return fw.WritePing(false, [8]byte{'h', 'b', 'o', 'n', 'e'})
					})
				})
			}
			if c.cfg.idleTimeout > 0 {
				c.mu.Lock()
				idle := len(c.streams) == 0 && c.handlers == 0 && now.Sub(c.idleSince) >= c.cfg.idleTimeout
				c.mu.Unlock()
				if idle {
					// Closes gracefully if still idle, else once the
					// streams opened meanwhile have ended.
					c.goAway(http2.ErrCodeNo, "idle")
				}
			}
		}
	}
}

// keeperWrite runs a write of the keeper with a write deadline, so that a
// peer that stops reading cannot block the goroutine that detects dead
// peers.
func (c *conn) keeperWrite(fn func()) {
	c.bc.setWriteDeadline(time.Now().Add(c.cfg.pingTimeout))
	fn()
	c.bc.setWriteDeadline(time.Time{})
}

// readLoop reads frames until the connection fails.
func (c *conn) readLoop() {
	defer c.wg.Done()
	err := c.readFrames()
	var ce http2.ConnectionError
	switch {
	case errors.As(err, &ce):
		c.log.Debug("HBONE connection error; sending GOAWAY", "src", c.remote.String(), "code", http2.ErrCode(ce).String(), "error", err)
		c.mu.Lock()
		last := c.lastPeerID
		c.mu.Unlock()
		c.bc.setWriteDeadline(time.Now().Add(lingerTimeout))
		_ = c.writeControl(true, func(fw *http2.Framer) error {
			return fw.WriteGoAway(last, http2.ErrCode(ce), nil)
		})
		// Read on, discarding, until the peer closes: a close with
		// unread bytes would reset the connection and could discard the
		// GOAWAY before the peer reads why.
		c.closeGracefully(err)
		_ = c.bc.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
		_, _ = io.Copy(io.Discard, c.bc.Conn)
	case errors.Is(err, io.EOF):
		err = errors.New("peer closed the connection")
	}
	c.fail(err)
}

// protoError is a connection error with a reason for the log.
type protoError struct {
	code   http2.ErrCode
	reason string
}

func (e protoError) Error() string { return fmt.Sprintf("HTTP/2 %v: %s", e.code, e.reason) }

// As lets errors.As find the code as an http2.ConnectionError.
func (e protoError) As(target any) bool {
	if p, ok := target.(*http2.ConnectionError); ok {
		*p = http2.ConnectionError(e.code)
		return true
	}
	return false
}

func (c *conn) readFrames() error {
	if c.cfg.server {
		if err := c.readPreface(); err != nil {
			return err
		}
	}
	if c.bc.rc != nil {
		return c.readEvented(c.bc.rc)
	}
	return c.readBuffered()
}

// readPreface reads the client preface and the first SETTINGS frame,
// which must arrive within the preface timeout.
func (c *conn) readPreface() error {
	_ = c.tc.SetReadDeadline(time.Now().Add(c.cfg.prefaceTimeout))
	var buf [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.tc, buf[:]); err != nil {
		c.timeoutCheck(err, "client preface")
		return fmt.Errorf("reading HTTP/2 client preface: %w", err)
	}
	if string(buf[:]) != http2.ClientPreface {
		return protoError{http2.ErrCodeProtocol, "bad client preface"}
	}
	err := c.fb.fill()
	var f http2.Frame
	if err == nil {
		f, err = c.fr.ReadFrame()
	}
	if err != nil {
		c.timeoutCheck(err, "client SETTINGS")
		return fmt.Errorf("reading the client's first SETTINGS: %w", err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return protoError{http2.ErrCodeProtocol, "first frame is not SETTINGS"}
	}
	_ = c.tc.SetReadDeadline(time.Time{})
	c.frames.Add(1)
	return c.onSettings(sf)
}

func (c *conn) timeoutCheck(err error, what string) {
	var te interface{ Timeout() bool }
	if errors.As(err, &te) && te.Timeout() {
		c.cfg.ctr.timeouts.Add(1)
		c.cfg.ctr.logOnce(&c.cfg.ctr.loggedTimeout, c.log, "HBONE peer too slow; closing its connection (logged once)", "phase", what, "src", c.remote.String())
	}
}

func (c *conn) handleFrame(f http2.Frame) error {
	if c.block.active {
		if cf, ok := f.(*http2.ContinuationFrame); ok {
			return c.onContinuation(cf)
		}
		// The Framer already refuses anything else here.
		return protoError{http2.ErrCodeProtocol, "expected CONTINUATION"}
	}
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.HeadersFrame:
		return c.onHeaders(f)
	case *http2.SettingsFrame:
		if err := c.budget.spend(c, "SETTINGS"); err != nil {
			return err
		}
		if f.IsAck() {
			return nil
		}
		return c.onSettings(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		if err := c.budget.spend(c, "PING"); err != nil {
			return err
		}
		data := f.Data
		return c.writeControlAsync(func(fw *http2.Framer) error { return fw.WritePing(true, data) })
	case *http2.RSTStreamFrame:
		if err := c.budget.spend(c, "RST_STREAM"); err != nil {
			return err
		}
		return c.onRST(f)
	case *http2.GoAwayFrame:
		return c.onGoAway(f)
	case *http2.PushPromiseFrame:
		return protoError{http2.ErrCodeProtocol, "PUSH_PROMISE is not allowed"}
	case *http2.ContinuationFrame:
		return protoError{http2.ErrCodeProtocol, "CONTINUATION without HEADERS"}
	case *http2.PriorityFrame:
		if f.StreamID == f.StreamDep {
			c.resetStream(f.StreamID, http2.ErrCodeProtocol)
		}
		return c.budget.spend(c, "PRIORITY")
	default:
		return c.budget.spend(c, "unknown frame")
	}
}

// writeControlAsync queues a control frame from the read loop.
func (c *conn) writeControlAsync(fn func(fw *http2.Framer) error) error {
	err := c.writeControl(false, fn)
	if errors.Is(err, errConnClosed) {
		return err
	}
	return nil
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	var tableSize uint32
	var haveTable bool
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			if ce, ok := err.(http2.ConnectionError); ok {
				return protoError{http2.ErrCode(ce), "invalid setting " + s.String()}
			}
			return protoError{http2.ErrCodeProtocol, "invalid setting " + s.String()}
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		switch s.ID {
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = s.Val
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.peerInitWin
			c.peerInitWin = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > 1<<31-1 {
					return protoError{http2.ErrCodeFlowControl, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window"}
				}
			}
			c.flowCond.Broadcast()
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = int(s.Val)
		case http2.SettingHeaderTableSize:
			tableSize, haveTable = s.Val, true
		case http2.SettingEnablePush:
			if !c.cfg.server && s.Val != 0 {
				return protoError{http2.ErrCodeProtocol, "server sent SETTINGS_ENABLE_PUSH"}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return c.writeControlAsync(func(fw *http2.Framer) error {
		if haveTable {
			c.henc.SetMaxDynamicTableSizeLimit(tableSize)
		}
		return fw.WriteSettingsAck()
	})
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	inc := int64(f.Increment)
	c.mu.Lock()
	if f.StreamID == 0 {
		c.sendWin += inc
		over := c.sendWin > 1<<31-1
		c.flowCond.Broadcast()
		c.mu.Unlock()
		if over {
			return protoError{http2.ErrCodeFlowControl, "connection window overflow"}
		}
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		idle := c.idleStreamLocked(f.StreamID)
		c.mu.Unlock()
		if idle {
			return protoError{http2.ErrCodeProtocol, "WINDOW_UPDATE on an idle stream"}
		}
		return nil
	}
	s.sendWin += inc
	over := s.sendWin > 1<<31-1
	c.flowCond.Broadcast()
	c.mu.Unlock()
	if over {
		c.resetStream(f.StreamID, http2.ErrCodeFlowControl)
	}
	return nil
}

// idleStreamLocked reports whether id names a stream that was never
// opened (RFC 9113 §5.1 "idle").
func (c *conn) idleStreamLocked(id uint32) bool {
	if c.cfg.server {
		return id%2 == 1 && id > c.lastPeerID || id%2 == 0
	}
	return id%2 == 0 || id > c.maxOpened.Load()
}

func (c *conn) onRST(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	idle := s == nil && c.idleStreamLocked(f.StreamID)
	// The peer knows the stream is closed now: frames it sends on it
	// later are errors again, also if we had reset it first.
	for i, r := range c.resetIDs {
		if r == f.StreamID {
			c.resetIDs[i] = 0
		}
	}
	c.mu.Unlock()
	if idle {
		return protoError{http2.ErrCodeProtocol, "RST_STREAM on an idle stream"}
	}
	if s == nil {
		return nil
	}
	var err error
	switch {
	case f.ErrCode == http2.ErrCodeRefusedStream:
		err = errRefused
	default:
		err = http2.StreamError{StreamID: f.StreamID, Code: f.ErrCode}
	}
	s.peerReset(f.ErrCode, err)
	return nil
}

func (c *conn) onGoAway(f *http2.GoAwayFrame) error {
	c.mu.Lock()
	c.goAwayRecv = true
	c.goAwayLast = f.LastStreamID
	var refused []*stream
	for id, s := range c.streams {
		if !c.cfg.server && id > f.LastStreamID {
			refused = append(refused, s)
		}
	}
	idle := len(c.streams)-len(refused) == 0 && c.handlers == 0
	c.mu.Unlock()
	if f.ErrCode != http2.ErrCodeNo {
		c.log.Debug("HBONE peer sent GOAWAY", "src", c.remote.String(), "code", f.ErrCode.String(), "debug", string(f.DebugData()))
	}
	for _, s := range refused {
		s.abortWith(errRefused, http2.ErrCodeRefusedStream, false)
	}
	if idle {
		return errors.New("peer sent GOAWAY")
	}
	return nil
}

// resetStream sends RST_STREAM and ends the stream locally.
func (c *conn) resetStream(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	s := c.streams[id]
	c.mu.Unlock()
	if s != nil {
		s.abort(http2.StreamError{StreamID: id, Code: code}, code)
		return
	}
	c.noteReset(id)
	_ = c.writeControlAsync(func(fw *http2.Framer) error { return fw.WriteRSTStream(id, code) })
}

// removeStream forgets s once both directions are closed or it was reset.
func (c *conn) removeStream(s *stream) {
	c.mu.Lock()
	if c.streams[s.id] != s {
		c.mu.Unlock()
		return
	}
	delete(c.streams, s.id)
	empty := len(c.streams) == 0 && c.handlers == 0
	if empty {
		c.idleSince = time.Now()
	}
	closing := empty && (c.goAwaySent || c.goAwayRecv)
	c.flowCond.Broadcast()
	c.mu.Unlock()
	if closing {
		c.closeGracefully(errors.New("last stream ended after GOAWAY"))
	}
}

// handlerDone releases a server stream's handler slot.
func (c *conn) handlerDone() {
	c.mu.Lock()
	c.handlers--
	empty := len(c.streams) == 0 && c.handlers == 0
	if empty {
		c.idleSince = time.Now()
	}
	closing := empty && (c.goAwaySent || c.goAwayRecv)
	c.mu.Unlock()
	if closing {
		c.closeGracefully(errors.New("last stream ended after GOAWAY"))
	}
}

// consumed returns n bytes of connection window once the application
// took them; it sends WINDOW_UPDATE when half the window is used.
func (c *conn) consumed(n int, inline bool) {
	if n == 0 {
		return
	}
	c.mu.Lock()
	c.recvUnacked += int64(n)
	var inc int64
	if c.recvUnacked >= int64(c.cfg.flow.ConnWindow)/2 {
		inc = c.recvUnacked
		c.recvUnacked = 0
		c.recvWin += inc
	}
	c.mu.Unlock()
	if inc > 0 {
		c.writeWindowUpdate(inline, 0, uint32(inc))
	}
}

func (c *conn) onData(f *http2.DataFrame) error {
	flowLen := int(f.Length)
	data := f.Data()
	switch {
	case len(data) > 0:
		c.budget.earn()
	case !f.StreamEnded():
		if err := c.budget.spend(c, "empty DATA"); err != nil {
			return err
		}
	}
	c.mu.Lock()
	if int64(flowLen) > c.recvWin {
		c.mu.Unlock()
		return protoError{http2.ErrCodeFlowControl, "connection receive window exceeded"}
	}
	c.recvWin -= int64(flowLen)
	s := c.streams[f.StreamID]
	idle := s == nil && c.idleStreamLocked(f.StreamID)
	// DATA the peer sent before it saw our RST_STREAM is ignored (RFC 9113
	// section 5.1, "closed"): answering each frame with another RST_STREAM
	// would only spend the peer's flood budget.
	wasReset := s == nil && c.wasResetLocked(f.StreamID)
	c.mu.Unlock()
	if idle {
		return protoError{http2.ErrCodeProtocol, "DATA on an idle stream"}
	}
	if s == nil {
		c.consumed(flowLen, false)
		if !wasReset {
			c.writeRST(false, f.StreamID, http2.ErrCodeStreamClosed)
		}
		return nil
	}
	s.onData(data, flowLen, f.StreamEnded())
	return nil
}

// noteReset remembers that we reset stream id.
func (c *conn) noteReset(id uint32) {
	c.mu.Lock()
	c.resetIDs[c.resetNext] = id
	c.resetNext = (c.resetNext + 1) % len(c.resetIDs)
	c.mu.Unlock()
}

// wasResetLocked reports whether we reset stream id recently; c.mu held.
func (c *conn) wasResetLocked(id uint32) bool {
	for _, r := range c.resetIDs {
		if r == id && id != 0 {
			return true
		}
	}
	return false
}
