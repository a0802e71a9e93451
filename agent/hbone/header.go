package hbone

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// DefaultMaxHeaderBytes bounds a request's header block, encoded and
// decoded (HPACK can expand a small block). An HBONE CONNECT carries an
// authority and three short metadata headers; 8 KiB is plenty.
const DefaultMaxHeaderBytes = 8 << 10

// maxContinuations bounds the CONTINUATION frames of one header block.
const maxContinuations = 16

// headerBlock is a header block being assembled from HEADERS and
// CONTINUATION frames (read loop only).
type headerBlock struct {
	active  bool
	id      uint32
	end     bool
	selfDep bool
	frames  int
	buf     []byte
}

func (c *conn) onHeaders(f *http2.HeadersFrame) error {
	frag := f.HeaderBlockFragment()
	c.block = headerBlock{
		active:  true,
		id:      f.StreamID,
		end:     f.StreamEnded(),
		selfDep: f.HasPriority() && f.Priority.StreamDep == f.StreamID,
		frames:  1,
		buf:     append(c.block.buf[:0], frag...),
	}
	if len(c.block.buf) > c.cfg.maxHeaderBytes {
		return c.headerTooLarge()
	}
	if !f.HeadersEnded() {
		// The rest of the block must come soon: nothing else may be
		// sent on the connection until it is complete.
		_ = c.tc.SetReadDeadline(time.Now().Add(c.cfg.prefaceTimeout))
		return nil
	}
	return c.endBlock()
}

func (c *conn) onContinuation(f *http2.ContinuationFrame) error {
	c.block.frames++
	c.block.buf = append(c.block.buf, f.HeaderBlockFragment()...)
	if len(c.block.buf) > c.cfg.maxHeaderBytes || c.block.frames > maxContinuations {
		return c.headerTooLarge()
	}
	if !f.HeadersEnded() {
		return nil
	}
	_ = c.tc.SetReadDeadline(time.Time{})
	return c.endBlock()
}

func (c *conn) headerTooLarge() error {
	c.cfg.ctr.headerTooLarge.Add(1)
	c.cfg.ctr.logOnce(&c.cfg.ctr.loggedHeader, c.log, "HBONE peer sent a header block over the limit; closing its connection (logged once)",
		"src", c.remote.String(), "limit_bytes", c.cfg.maxHeaderBytes)
	return protoError{http2.ErrCodeEnhanceYourCalm, "header block too large"}
}

// onField collects decoded fields up to the size limit.
func (c *conn) onField(hf hpack.HeaderField) {
	if c.hdrBad {
		return
	}
	c.fieldSz += int(hf.Size())
	if c.fieldSz > c.cfg.maxHeaderBytes {
		c.hdrBad = true
		return
	}
	c.fields = append(c.fields, hf)
}

func (c *conn) endBlock() error {
	b := c.block
	c.block.active = false
	c.fields = c.fields[:0]
	c.fieldSz = 0
	c.hdrBad = false
	if _, err := c.hdec.Write(b.buf); err != nil {
		return protoError{http2.ErrCodeCompression, "bad HPACK block"}
	}
	if err := c.hdec.Close(); err != nil {
		return protoError{http2.ErrCodeCompression, "truncated HPACK block"}
	}
	if cap(c.block.buf) > 2*c.cfg.maxHeaderBytes {
		c.block.buf = nil
	}
	if c.hdrBad {
		return c.headerTooLarge()
	}
	fields := c.fields
	defer func() { // drop the strings once handled
		clear(c.fields)
		c.fields = c.fields[:0]
	}()
	if b.selfDep {
		c.resetStream(b.id, http2.ErrCodeProtocol)
		return nil
	}
	if c.cfg.server {
		return c.onRequest(b.id, b.end, fields)
	}
	return c.onResponse(b.id, b.end, fields)
}

// connectionHeaders are not allowed in HTTP/2 (RFC 9113 §8.2.2).
var connectionHeaders = map[string]bool{
	"connection": true, "keep-alive": true, "proxy-connection": true,
	"transfer-encoding": true, "upgrade": true,
}

// request is a parsed request header block.
type request struct {
	method, authority, scheme, path string
	header                          http.Header
}

// parseRequest checks a request header block against RFC 9113 §8.3.1;
// an error means a malformed request (a stream error).
func parseRequest(fields []hpack.HeaderField) (request, error) {
	var r request
	seen := map[string]bool{}
	regular := false
	for _, f := range fields {
		if !httpguts.ValidHeaderFieldValue(f.Value) {
			return r, fmt.Errorf("invalid value for header %q", f.Name)
		}
		if strings.HasPrefix(f.Name, ":") {
			if regular {
				return r, fmt.Errorf("pseudo-header %s after a regular header", f.Name)
			}
			if seen[f.Name] {
				return r, fmt.Errorf("duplicate pseudo-header %s", f.Name)
			}
			seen[f.Name] = true
			switch f.Name {
			case ":method":
				r.method = f.Value
			case ":authority":
				r.authority = f.Value
			case ":scheme":
				r.scheme = f.Value
			case ":path":
				r.path = f.Value
			default:
				return r, fmt.Errorf("pseudo-header %s not allowed in a request", f.Name)
			}
			continue
		}
		regular = true
		if !validFieldName(f.Name) {
			return r, fmt.Errorf("invalid header name %q", f.Name)
		}
		if connectionHeaders[f.Name] || (f.Name == "te" && f.Value != "trailers") {
			return r, fmt.Errorf("connection-specific header %q", f.Name)
		}
		if r.header == nil {
			r.header = make(http.Header, 4)
		}
		k := http.CanonicalHeaderKey(f.Name)
		r.header[k] = append(r.header[k], f.Value)
	}
	if r.header == nil {
		r.header = http.Header{}
	}
	switch {
	case !seen[":method"]:
		return r, fmt.Errorf("missing :method")
	case r.method == http.MethodConnect:
		if seen[":scheme"] || seen[":path"] {
			return r, fmt.Errorf("CONNECT with :scheme or :path")
		}
		if r.authority == "" {
			return r, fmt.Errorf("CONNECT without :authority")
		}
	case r.scheme == "" || r.path == "":
		return r, fmt.Errorf("missing :scheme or :path")
	}
	return r, nil
}

// validFieldName: a token in lower case.
func validFieldName(s string) bool {
	if !httpguts.ValidHeaderFieldName(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return false
		}
	}
	return true
}

// writeHeaders encodes fields (name, value pairs) and writes HEADERS (and
// CONTINUATION when the block exceeds the peer's frame size). It is called
// with c.wmu held, because HPACK state follows the order of blocks on the
// wire.
func (c *conn) writeHeadersLocked(id uint32, end bool, fields ...string) error {
	c.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		if err := c.henc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]}); err != nil {
			return err
		}
	}
	return c.writeBlockLocked(id, end)
}

func (c *conn) writeBlockLocked(id uint32, end bool) error {
	c.mu.Lock()
	maxFrame := c.peerMaxFrame
	c.mu.Unlock()
	block := c.hbuf.Bytes()
	first := true
	for first || len(block) > 0 {
		n := min(len(block), maxFrame)
		frag := block[:n]
		block = block[n:]
		var err error
		if first {
			err = c.fw.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: end, EndHeaders: len(block) == 0})
			first = false
		} else {
			err = c.fw.WriteContinuation(id, len(block) == 0, frag)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// respond sends the response HEADERS of a server stream.
func (s *stream) respond(status int, end bool) error {
	c := s.c
	if end {
		// Before the write: the peer may answer the END_STREAM before
		// this goroutine runs again (see onRequest).
		c.mu.Lock()
		if s.sendErr == nil {
			s.sendErr = errSendClosed
		}
		c.mu.Unlock()
	}
	if err := c.lockWriter(false); err != nil {
		return err
	}
	if err := c.writeHeadersLocked(s.id, end, ":status", strconv.Itoa(status)); err != nil {
		c.wmu.Unlock()
		return err
	}
	if err := c.commitLocked(true); err != nil {
		return err
	}
	if end {
		s.mu.Lock()
		s.sentEnd = true
		done := s.recvEnd && s.err == nil
		s.mu.Unlock()
		if done {
			c.removeStream(s)
		}
	}
	return nil
}

// onResponse handles a response header block on a client stream.
func (c *conn) onResponse(id uint32, end bool, fields []hpack.HeaderField) error {
	c.mu.Lock()
	s := c.streams[id]
	idle := s == nil && c.idleStreamLocked(id)
	c.mu.Unlock()
	if idle {
		return protoError{http2.ErrCodeProtocol, "HEADERS on an idle stream"}
	}
	if s == nil {
		return nil
	}
	status := 0
	for _, f := range fields {
		if f.Name == ":status" && status == 0 {
			v, err := strconv.Atoi(f.Value)
			if err != nil || v < 100 || v > 999 || len(f.Value) != 3 {
				c.resetStream(id, http2.ErrCodeProtocol)
				return nil
			}
			status = v
		} else if strings.HasPrefix(f.Name, ":") {
			c.resetStream(id, http2.ErrCodeProtocol)
			return nil
		}
	}
	s.mu.Lock()
	if s.status != 0 {
		// Trailers: only END_STREAM matters for a tunnel.
		s.mu.Unlock()
		if !end || status != 0 {
			c.resetStream(id, http2.ErrCodeProtocol)
			return nil
		}
		s.onData(nil, 0, true)
		return nil
	}
	if status == 0 || (status < 200 && end) {
		s.mu.Unlock()
		c.resetStream(id, http2.ErrCodeProtocol)
		return nil
	}
	if status < 200 {
		s.mu.Unlock()
		return nil // informational
	}
	s.status = status
	if s.respCh != nil {
		close(s.respCh)
		s.respCh = nil
	}
	s.mu.Unlock()
	if end {
		s.onData(nil, 0, true)
	}
	return nil
}

// onRequest handles a request header block on the server.
func (c *conn) onRequest(id uint32, end bool, fields []hpack.HeaderField) error {
	if id%2 == 0 {
		return protoError{http2.ErrCodeProtocol, "client used an even stream ID"}
	}
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		sendDone := s.sendErr != nil // our END_STREAM (or reset) is out or going
		c.mu.Unlock()
		s.mu.Lock()
		ended := s.recvEnd
		s.mu.Unlock()
		switch {
		case ended && sendDone: // closed, only not forgotten yet
			return protoError{http2.ErrCodeStreamClosed, "HEADERS on a closed stream"}
		case ended: // half-closed (remote): STREAM_CLOSED (RFC 9113 §5.1)
			c.writeRST(false, id, http2.ErrCodeStreamClosed)
			return nil
		}
		// Trailers on an answered request are fine with END_STREAM;
		// anything else on a tunnel is a stream error (RFC 9113 §8.5).
		if s.discard && end {
			s.onData(nil, 0, true)
			return nil
		}
		c.resetStream(id, http2.ErrCodeProtocol)
		return nil
	}
	if id <= c.lastPeerID {
		reset := c.wasResetLocked(id)
		c.mu.Unlock()
		if reset { // late trailers on a stream we reset (RFC 9113 §5.1)
			// Malformed trailers (§8.1: without END_STREAM, or with a
			// pseudo-header) are still a stream error.
			bad := !end
			for _, f := range fields {
				bad = bad || f.IsPseudo()
			}
			if bad {
				c.writeRST(false, id, http2.ErrCodeProtocol)
			}
			return c.budget.spend(c, "HEADERS on a reset stream")
		}
		return protoError{http2.ErrCodeStreamClosed, "HEADERS on a closed stream"}
	}
	c.lastPeerID = id
	going := c.goAwaySent
	full := c.handlers >= c.cfg.maxStreams
	c.mu.Unlock()
	if going {
		c.writeRST(false, id, http2.ErrCodeRefusedStream)
		return nil
	}
	if full {
		c.cfg.ctr.streamLimit.Add(1)
		c.cfg.ctr.logOnce(&c.cfg.ctr.loggedStreams, c.log, "HBONE peer opened more concurrent streams than allowed; refusing them (logged once)",
			"src", c.remote.String(), "limit", c.cfg.maxStreams)
		c.writeRST(false, id, http2.ErrCodeRefusedStream)
		return c.budget.spend(c, "refused stream")
	}
	r, err := parseRequest(fields)
	if err != nil {
		c.log.Debug("malformed HBONE request", "src", c.remote.String(), "error", err)
		c.writeRST(false, id, http2.ErrCodeProtocol)
		return nil
	}
	s := newStream(c, id)
	s.recvEnd = end
	s.ctx, s.cancel = context.WithCancel(c.ctx)
	c.mu.Lock()
	s.sendWin = c.peerInitWin
	c.streams[id] = s
	c.handlers++
	c.mu.Unlock()
	if r.method != http.MethodConnect {
		// 400 like ztunnel, not 405: nothing but CONNECT exists here.
		s.discard = true
		c.wg.Add(1)
		go c.answerBadRequest(s, "HBONE accepts only CONNECT requests\n")
		return nil
	}
	target, err := ParseAuthority(r.authority)
	if err != nil {
		s.discard = true
		c.log.Debug("HBONE CONNECT refused", "peer", c.peer.String(), "error", err)
		c.wg.Add(1)
		go c.answerBadRequest(s, "")
		return nil
	}
	c.cfg.serve(c, s, &Request{Peer: c.peer, Target: target, Header: r.header, RemoteAddr: c.remote})
	return nil
}

// answerBadRequest answers 400, with a short body if there is one.
func (c *conn) answerBadRequest(s *stream, body string) {
	defer c.wg.Done()
	defer c.handlerDone()
	defer s.cancel()
	if body == "" {
		_ = s.respond(http.StatusBadRequest, true)
	} else if s.respond(http.StatusBadRequest, false) == nil {
		if s.sendCopy([]byte(body), 0) == nil {
			_ = s.closeSend()
		}
	}
	s.stopPeer()
}

// stopPeer ends a stream whose response is complete but whose request
// side is still open: RST_STREAM NO_ERROR tells the peer to stop sending.
func (s *stream) stopPeer() {
	s.mu.Lock()
	open := !s.recvEnd && s.err == nil
	s.mu.Unlock()
	if open {
		s.abort(errPeerStoppedLocal, http2.ErrCodeNo)
	}
}

var errPeerStoppedLocal = fmt.Errorf("hbone: stream ended by its handler")
