package l7

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"
)

// DefaultDetectTimeout is how long Detect waits for a client's first
// bytes. A server-first protocol (the server speaks first: SMTP, MySQL)
// sends nothing, so its connections wait this long once, then stay at L4;
// declare appProtocol: tcp on such ports to skip the wait.
const DefaultDetectTimeout = 200 * time.Millisecond

// Detect reads the first bytes a client sends on c until Sniff decides, at
// most MaxSniff bytes and until timeout has passed. It returns the protocol
// and every byte it read, which the caller must send on before anything
// else (Replay, or a write to the upstream connection). The read deadline
// of c is cleared before returning. An error means c failed or closed
// before anything was decided; prefix still holds what was read.
func Detect(c net.Conn, timeout time.Duration) (p Protocol, prefix []byte, err error) {
	if timeout <= 0 {
		timeout = DefaultDetectTimeout
	}
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return TCP, nil, fmt.Errorf("setting the protocol detection deadline: %w", err)
	}
	defer c.SetReadDeadline(time.Time{}) //nolint:errcheck // best effort; the conn is used on regardless
	buf := make([]byte, 0, 512)
	for {
		if len(buf) == cap(buf) {
			nb := make([]byte, len(buf), min(2*cap(buf), MaxSniff))
			copy(nb, buf)
			buf = nb
		}
		n, rerr := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if rerr != nil {
			p, _ := Sniff(buf, true)
			if errors.Is(rerr, os.ErrDeadlineExceeded) {
				return p, buf, nil
			}
			if p != TCP {
				return p, buf, nil
			}
			return TCP, buf, fmt.Errorf("reading the first bytes: %w", rerr)
		}
		if p, more := Sniff(buf, false); !more {
			return p, buf, nil
		}
	}
}

// Replay returns a net.Conn whose reads return prefix first, then read
// from c. Everything else is c's.
func Replay(c net.Conn, prefix []byte) net.Conn {
	if len(prefix) == 0 {
		return c
	}
	return &replayConn{Conn: c, prefix: prefix}
}

type replayConn struct {
	net.Conn
	prefix []byte
}

// CloseWrite half-closes c if it can (a TCP socket, a tunnel stream), so
// that a connection that fell back to L4 keeps its half-close.
func (r *replayConn) CloseWrite() error {
	if cw, ok := r.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

func (r *replayConn) Read(b []byte) (int, error) {
	if len(r.prefix) > 0 {
		n := copy(b, r.prefix)
		r.prefix = r.prefix[n:]
		return n, nil
	}
	return r.Conn.Read(b)
}
