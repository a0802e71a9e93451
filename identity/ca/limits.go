package ca

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/time/rate"
)

// Every pod can reach the CA's port, so everything an unauthenticated
// caller can make the CA hold is bounded, per caller (source address) and
// in total. A caller is keyed by its source IP: agents are hostNetwork, so
// each node is one caller, and a pod cannot spend another node's budget.

// callerOf returns the source IP of a "host:port" remote address, with
// IPv4-mapped IPv6 addresses unmapped; the zero Addr when it does not
// parse (every such caller then shares one budget, which fails closed).
func callerOf(remote string) netip.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// counts holds per-caller counts of something held (connections,
// requests); entries exist only while their count is positive, so the map
// is bounded by what it counts.
type counts struct {
	mu    sync.Mutex
	n     map[netip.Addr]int
	total int
}

// acquire takes one unit for a if a holds fewer than perCaller and all
// callers together fewer than total (0: no total limit). It reports which
// limit refused, or "".
func (c *counts) acquire(a netip.Addr, perCaller, total int, perCallerLimit, totalLimit string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if total > 0 && c.total >= total {
		return totalLimit
	}
	if c.n[a] >= perCaller {
		return perCallerLimit
	}
	if c.n == nil {
		c.n = map[netip.Addr]int{}
	}
	c.n[a]++
	c.total++
	return ""
}

func (c *counts) release(a netip.Addr) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total--
	if c.n[a]--; c.n[a] <= 0 {
		delete(c.n, a)
	}
}

// failures limits authentication failures per caller with a token bucket
// each. The buckets live in a bounded LRU: a caller evicted by a flood of
// other addresses starts with a full bucket again, which only loosens the
// limit for that caller and never costs memory.
type failures struct {
	every rate.Limit
	burst int
	lru   *lru.Cache[netip.Addr, *rate.Limiter]
}

func newFailures(perSecond float64, burst, size int) (*failures, error) {
	c, err := lru.New[netip.Addr, *rate.Limiter](size)
	if err != nil {
		return nil, fmt.Errorf("creating the per-caller failure limiter: %w", err)
	}
	return &failures{every: rate.Limit(perSecond), burst: burst, lru: c}, nil
}

// exhausted reports whether a has no failures left to spend.
func (f *failures) exhausted(a netip.Addr) bool {
	l, ok := f.lru.Get(a)
	return ok && l.Tokens() < 1
}

// record spends one failure of a.
func (f *failures) record(a netip.Addr) {
	l, ok := f.lru.Get(a)
	if !ok {
		l = rate.NewLimiter(f.every, f.burst)
		if prev, found, _ := f.lru.PeekOrAdd(a, l); found {
			l = prev
		}
	}
	l.Allow()
}

// limitListener closes connections beyond the per-caller and total limits
// as soon as they are accepted, before any TLS work, and counts and logs
// each refusal.
type limitListener struct {
	net.Listener
	perCaller, total int
	held             counts
	onLimit          func(limit, remote string)
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		a := callerOf(c.RemoteAddr().String())
		if limit := l.held.acquire(a, l.perCaller, l.total, LimitConnsPerCaller, LimitConns); limit != "" {
			_ = c.Close()
			l.onLimit(limit, c.RemoteAddr().String())
			continue
		}
		return &limitConn{Conn: c, release: func() { l.held.release(a) }}, nil
	}
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// limitHit counts a hit of limit and logs it (rate-limited).
func (s *Server) limitHit(ctx context.Context, limit, remote, detail string) {
	s.metrics.limits.WithLabelValues(limit).Inc()
	s.limitLog.hit(ctx, limit, remote, detail)
}
