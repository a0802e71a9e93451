package proxy

// InflightEndpoints returns how many endpoints the balancer counts
// connections for (tests check it returns to zero).
func (p *Proxy) InflightEndpoints() int {
	p.bal.mu.Lock()
	defer p.bal.mu.Unlock()
	return len(p.bal.inflight)
}
