package hbone

import (
	"log/slog"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// counters are shared by a Pool's or a Server's connections. Every limit
// that is hit is counted here (and exposed by Stats for metrics) and
// logged once per Pool or Server.
type counters struct {
	handshakes, handshakeErrors atomic.Uint64
	handshakeLimit              atomic.Uint64 // connections closed: too many handshakes in flight
	peerLimit                   atomic.Uint64 // connections closed: too many from one peer address
	timeouts                    atomic.Uint64 // handshake, preface or header block too slow
	headerTooLarge              atomic.Uint64 // header blocks over the limit
	streamLimit                 atomic.Uint64 // streams refused: too many concurrent
	floods                      atomic.Uint64 // connections closed for unproductive frames
	pingTimeouts                atomic.Uint64 // connections closed: PING unanswered
	responseTimeouts            atomic.Uint64 // CONNECTs without a response in time (client)
	certExpired                 atomic.Uint64 // connections drained because a certificate expired

	loggedHandshake, loggedPeer, loggedTimeout, loggedHeader, loggedStreams, loggedFlood atomic.Bool
}

func (k *counters) logOnce(flag *atomic.Bool, log *slog.Logger, msg string, args ...any) {
	if flag.CompareAndSwap(false, true) {
		log.Warn(msg, args...)
	}
}

// LimitStats count how often each protection of the tunnel was hit.
type LimitStats struct {
	HandshakeLimit   uint64 // connections closed because too many TLS handshakes were in flight
	PeerConnLimit    uint64 // connections closed because one peer address had too many
	Timeouts         uint64 // connections closed because a handshake, preface or header block was too slow, or the peer stopped reading
	HeaderTooLarge   uint64 // connections closed for a header block over the limit
	StreamLimit      uint64 // streams refused (REFUSED_STREAM) over the concurrency limit
	Floods           uint64 // connections closed for floods of unproductive frames (ENHANCE_YOUR_CALM)
	PingTimeouts     uint64 // connections closed because the peer did not answer a PING
	ResponseTimeouts uint64 // CONNECTs reset because no response came in time
}

func (k *counters) limits() LimitStats {
	return LimitStats{
		HandshakeLimit:   k.handshakeLimit.Load(),
		PeerConnLimit:    k.peerLimit.Load(),
		Timeouts:         k.timeouts.Load(),
		HeaderTooLarge:   k.headerTooLarge.Load(),
		StreamLimit:      k.streamLimit.Load(),
		Floods:           k.floods.Load(),
		PingTimeouts:     k.pingTimeouts.Load(),
		ResponseTimeouts: k.responseTimeouts.Load(),
	}
}

// floodBudget limits frames that cost us work but move no data (PING,
// SETTINGS, RST_STREAM, PRIORITY, empty DATA, unknown types, refused
// streams): the budget starts full, each such frame spends one token,
// each non-empty DATA frame earns one back, and time refills
// it slowly, so honest keep-alives never run it dry. An empty budget
// closes the connection with ENHANCE_YOUR_CALM. Read loop only.
type floodBudget struct {
	tokens int
	last   time.Time
}

const (
	floodBudgetMax    = 1000
	floodRefillPerSec = 100
)

func (b *floodBudget) init() {
	b.tokens = floodBudgetMax
	b.last = time.Now()
}

func (b *floodBudget) earn() {
	if b.tokens < floodBudgetMax {
		b.tokens++
	}
}

func (b *floodBudget) spend(c *conn, what string) error {
	if b.tokens <= 0 {
		now := time.Now()
		if refill := int(now.Sub(b.last).Seconds() * floodRefillPerSec); refill > 0 {
			b.tokens = min(floodBudgetMax, refill)
			b.last = now
		}
	}
	if b.tokens <= 0 {
		c.cfg.ctr.floods.Add(1)
		c.cfg.ctr.logOnce(&c.cfg.ctr.loggedFlood, c.log, "HBONE peer flooded the connection with frames that carry no data; closing it (logged once)",
			"src", c.remote.String(), "frame", what)
		return protoError{http2.ErrCodeEnhanceYourCalm, "too many " + what + " frames"}
	}
	b.tokens--
	if b.tokens == floodBudgetMax-1 {
		b.last = time.Now()
	}
	return nil
}

// Add adds o's counters to s.
func (s *LimitStats) Add(o LimitStats) {
	s.HandshakeLimit += o.HandshakeLimit
	s.PeerConnLimit += o.PeerConnLimit
	s.Timeouts += o.Timeouts
	s.HeaderTooLarge += o.HeaderTooLarge
	s.StreamLimit += o.StreamLimit
	s.Floods += o.Floods
	s.PingTimeouts += o.PingTimeouts
	s.ResponseTimeouts += o.ResponseTimeouts
}

// AddCounters adds o's counters (not its gauges) to s.
func (s *ServerStats) AddCounters(o ServerStats) {
	s.Handshakes += o.Handshakes
	s.HandshakeErrors += o.HandshakeErrors
	s.ExpiredConns += o.ExpiredConns
	s.LimitStats.Add(o.LimitStats)
}

// Add adds o to s, gauges included.
func (s *ServerStats) Add(o ServerStats) {
	s.AddCounters(o)
	s.Conns += o.Conns
	s.Streams += o.Streams
	s.HandshakesInFlight += o.HandshakesInFlight
}

// AddCounters adds o's counters (not its gauges) to s.
func (s *PoolStats) AddCounters(o PoolStats) {
	s.Hits += o.Hits
	s.Misses += o.Misses
	s.Handshakes += o.Handshakes
	s.HandshakeErrors += o.HandshakeErrors
	s.ScaleOuts += o.ScaleOuts
	s.ResponseTimeouts += o.ResponseTimeouts
	s.PingTimeouts += o.PingTimeouts
	s.ExpiredConns += o.ExpiredConns
}

// Add adds o to s, gauges included.
func (s *PoolStats) Add(o PoolStats) {
	s.AddCounters(o)
	s.Conns += o.Conns
	s.Streams += o.Streams
}
