package policy

import (
	"fmt"

	lru "github.com/hashicorp/golang-lru/v2"
)

// DefaultCacheSize is the number of decisions an Engine keeps by default.
const DefaultCacheSize = 65536

// Engine caches decisions. Its methods are safe for concurrent use. The cache
// key is (snapshot version, evaluated directions, flow), so every snapshot
// given to one Engine must have a distinct version (the agent increments it
// on every change); old entries age out of the LRU.
type Engine struct {
	cache *lru.Cache[cacheKey, *Decision]
}

type cacheKey struct {
	version uint64
	dirs    dirMask
	flow    Flow
}

// NewEngine returns an Engine caching up to size decisions (DefaultCacheSize if size <= 0).
func NewEngine(size int) (*Engine, error) {
	if size <= 0 {
		size = DefaultCacheSize
	}
	c, err := lru.New[cacheKey, *Decision](size)
	if err != nil {
		return nil, fmt.Errorf("creating decision cache: %w", err)
	}
	return &Engine{cache: c}, nil
}

// Decide is Snapshot.Decide with caching. The returned Decision is shared: do not modify it.
func (e *Engine) Decide(s *Snapshot, f Flow) *Decision { return e.get(s, f, evalBoth) }

// DecideEgress is Snapshot.DecideEgress with caching.
func (e *Engine) DecideEgress(s *Snapshot, f Flow) *Decision { return e.get(s, f, evalEgress) }

// DecideIngress is Snapshot.DecideIngress with caching.
func (e *Engine) DecideIngress(s *Snapshot, f Flow) *Decision { return e.get(s, f, evalIngress) }

func (e *Engine) get(s *Snapshot, f Flow, dirs dirMask) *Decision {
	k := cacheKey{version: s.version, dirs: dirs, flow: f}
	if d, ok := e.cache.Get(k); ok {
		return d
	}
	d := s.decide(f, dirs)
	e.cache.Add(k, d)
	return d
}

// Purge drops every cached decision.
func (e *Engine) Purge() { e.cache.Purge() }
