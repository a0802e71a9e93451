package hbone

import "fmt"

// Flow-control defaults, chosen by BenchmarkTunnelBulk in agent/proxy (see
// docs/hbone.md for the numbers). HTTP/2's 64 KiB default window limits a
// stream to one window per round trip; a tunnel carries whole TCP
// connections, so it needs windows of the order of a TCP receive buffer.
const (
	DefaultStreamWindow = 4 << 20  // per-stream receive window, bytes
	DefaultConnWindow   = 16 << 20 // per-connection receive window, bytes
	DefaultMaxFrameSize = 64 << 10 // largest DATA frame we accept, bytes
	// DefaultMaxStreams is the most concurrent streams on one connection,
	// on both ends; the pool opens another connection beyond it.
	DefaultMaxStreams = 100
)

// FlowControl holds the HTTP/2 receive windows and frame size advertised by
// a Pool or a Server. Zero fields take the defaults above.
type FlowControl struct {
	StreamWindow int32
	ConnWindow   int32
	MaxFrameSize uint32
}

func (f FlowControl) withDefaults() (FlowControl, error) {
	if f.StreamWindow == 0 {
		f.StreamWindow = DefaultStreamWindow
	}
	if f.ConnWindow == 0 {
		f.ConnWindow = DefaultConnWindow
	}
	if f.MaxFrameSize == 0 {
		f.MaxFrameSize = DefaultMaxFrameSize
	}
	switch {
	case f.StreamWindow < 65535 || f.ConnWindow < 65535:
		return f, fmt.Errorf("flow-control windows must be at least 65535 bytes (HTTP/2 minimum), got stream %d, connection %d", f.StreamWindow, f.ConnWindow)
	case f.MaxFrameSize < 16384 || f.MaxFrameSize > 1<<24-1:
		return f, fmt.Errorf("max frame size must be in [16384, 16777215], got %d", f.MaxFrameSize)
	}
	return f, nil
}
