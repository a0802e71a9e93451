package policy

import (
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"sync/atomic"
	"weak"

	lru "github.com/hashicorp/golang-lru/v2"
)

// DefaultCacheSize is the number of decisions an Engine keeps by default.
const DefaultCacheSize = 65536

// Engine caches decisions. Its methods are safe for concurrent use.
//
// A cached decision stays valid across snapshots as long as nothing it read
// changed: a decision reads only the flow, the source's and the
// destination's pod entries (their pods and the policies that select them),
// their namespaces' labels, and the addresses of the destination's node.
// Each cache entry records those; a lookup in a newer snapshot checks them
// (a few map lookups) and re-evaluates only when one differs. With the
// entries a Builder reuses for unchanged pods, a change therefore
// invalidates only the decisions about the pods it touched, the pods of the
// namespace whose policies changed, or the flows that crossed a namespace
// whose labels changed; everything else stays cached.
type Engine struct {
	cache *lru.Cache[cacheKey, *cached]
}

type cacheKey struct {
	dirs dirMask
	flow Flow
}

type cached struct {
	d    *Decision
	deps deps
	// snapshot is the id of the last snapshot the entry was valid in: a
	// lookup in that snapshot skips the check.
	snapshot atomic.Uint64
}

// deps is what a decision read from its snapshot. The pod entries are held
// weakly: a cache entry must not keep the entries of old snapshots alive
// (a weak pointer equals another only if both were made from the same
// entry, even after it was collected, so comparing them stays exact).
type deps struct {
	src, dst     weak.Pointer[podEntry]
	srcNS, dstNS map[string]string
	dstNodeIPs   []netip.Addr
}

// depsOf looks up, without evaluating anything, what deciding f reads:
// the same lookups resolve makes, whether or not they then succeed.
func (s *Snapshot) depsOf(f *Flow) deps {
	var d deps
	lookup := func(key string, ip netip.Addr) *podEntry {
		if key != "" {
			return s.pods.Lookup(key)
		}
		return s.podsByIP.Lookup(ip.Unmap())
	}
	src, dst := lookup(f.SrcPod, f.Src), lookup(f.DstPod, f.Dst)
	d.src, d.dst = weak.Make(src), weak.Make(dst)
	if src != nil {
		d.srcNS = s.namespaces.Lookup(src.Namespace)
	}
	if dst != nil {
		d.dstNS = s.namespaces.Lookup(dst.Namespace)
		d.dstNodeIPs = s.nodeIPs.Lookup(dst.Node)
	}
	return d
}

func (d *deps) same(o *deps) bool {
	return d.src == o.src && d.dst == o.dst && sameLabels(d.srcNS, o.srcNS) && sameLabels(d.dstNS, o.dstNS) &&
		slices.Equal(d.dstNodeIPs, o.dstNodeIPs)
}

// sameLabels compares label maps, by identity first (a Builder reuses an
// unchanged namespace's map).
func sameLabels(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	if len(a) == 0 || reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer() {
		return true
	}
	return maps.Equal(a, b)
}

// NewEngine returns an Engine caching up to size decisions (DefaultCacheSize if size <= 0).
func NewEngine(size int) (*Engine, error) {
	if size <= 0 {
		size = DefaultCacheSize
	}
	c, err := lru.New[cacheKey, *cached](size)
	if err != nil {
		return nil, fmt.Errorf("creating decision cache: %w", err)
	}
	return &Engine{cache: c}, nil
}

// Decide is Snapshot.Decide with caching. The returned Decision is shared:
// do not modify it. A decision still valid in a later snapshot is returned
// as it was made, with the SnapshotVersion of the snapshot that evaluated it.
func (e *Engine) Decide(s *Snapshot, f Flow) *Decision { return e.get(s, f, evalBoth) }

// DecideEgress is Snapshot.DecideEgress with caching.
func (e *Engine) DecideEgress(s *Snapshot, f Flow) *Decision { return e.get(s, f, evalEgress) }

// DecideIngress is Snapshot.DecideIngress with caching.
func (e *Engine) DecideIngress(s *Snapshot, f Flow) *Decision { return e.get(s, f, evalIngress) }

func (e *Engine) get(s *Snapshot, f Flow, dirs dirMask) *Decision {
	k := cacheKey{dirs: dirs, flow: f}
	c, ok := e.cache.Get(k)
	if ok && c.snapshot.Load() == s.id {
		return c.d
	}
	d := s.depsOf(&f)
	if ok && c.deps.same(&d) {
		// Nothing the decision read changed: it holds in s too.
		c.snapshot.Store(s.id)
		return c.d
	}
	c = &cached{d: s.decide(f, dirs), deps: d}
	c.snapshot.Store(s.id)
	e.cache.Add(k, c)
	return c.d
}

// Purge drops every cached decision.
func (e *Engine) Purge() { e.cache.Purge() }
