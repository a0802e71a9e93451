package proxy

import (
	"math/rand/v2"
	"net/netip"
	"sync"
)

// balancer picks a Service endpoint by "power of two choices": two distinct
// endpoints are drawn at random and the one with fewer connections in
// flight from this agent wins (the first drawn on a tie). It needs no
// global state, avoids the herding of least-connections when many agents
// see the same counts, and converges on the load of slow endpoints
// (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing").
// Counts are per agent, over connections it currently proxies.
type balancer struct {
	mu       sync.Mutex
	inflight map[netip.AddrPort]int
}

// pick returns the index of the chosen endpoint and a release func that
// must be called when the connection ends. eps must not be empty.
func (b *balancer) pick(eps []Endpoint) (int, func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.inflight == nil {
		b.inflight = make(map[netip.AddrPort]int)
	}
	i := 0
	if n := len(eps); n > 1 {
		i = rand.IntN(n)
		j := rand.IntN(n - 1)
		if j >= i {
			j++
		}
		if b.inflight[eps[j].Addr] < b.inflight[eps[i].Addr] {
			i = j
		}
	}
	addr := eps[i].Addr
	b.inflight[addr]++
	return i, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.inflight[addr]--; b.inflight[addr] <= 0 {
			delete(b.inflight, addr)
		}
	}
}
