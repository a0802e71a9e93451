package state

import (
	"encoding/binary"
	"hash/maphash"
	"iter"
	"maps"
	"net/netip"
)

// pmap is a map that snapshots share: its entries are spread over a fixed
// number of shards (plain Go maps), and a new snapshot copies only the
// shards a change touches. A snapshot's maps are frozen once it is
// published; edit returns an editable copy for the next one, which shares
// every shard until set or del first touches it. The cost of a change is
// then one shard (size/shards entries) plus the shard table, not the whole
// map, while a lookup stays one hash and one Go map lookup.
type pmap[K comparable, V any] struct {
	hash   func(K) uint64
	shards *[pmapShards]map[K]V
	n      int
	// owned marks the shards this edit has already copied; nil once frozen.
	owned *[pmapShards]bool
}

// 256 shards: at 100,000 pods a shard holds about 400 entries, so copying
// one costs microseconds, and the table is 2 KiB per map per snapshot.
const (
	pmapBits   = 8
	pmapShards = 1 << pmapBits
)

func newPmap[K comparable, V any](hash func(K) uint64) pmap[K, V] { return pmap[K, V]{hash: hash} }

func (m *pmap[K, V]) shard(k K) int { return int(m.hash(k) >> (64 - pmapBits)) }

func (m *pmap[K, V]) get(k K) (V, bool) {
	if m.shards == nil {
		var zero V
		return zero, false
	}
	v, ok := m.shards[m.shard(k)][k]
	return v, ok
}

// lookup is get without the second result, for pointer values.
func (m *pmap[K, V]) lookup(k K) V {
	v, _ := m.get(k)
	return v
}

func (m *pmap[K, V]) len() int { return m.n }

func (m *pmap[K, V]) all() iter.Seq2[K, V] {
	return func(yield func(K, V) bool) {
		if m.shards == nil {
			return
		}
		for _, s := range m.shards {
			for k, v := range s {
				if !yield(k, v) {
					return
				}
			}
		}
	}
}

// edit returns a copy of m for the next snapshot; m itself is unchanged.
func (m pmap[K, V]) edit() pmap[K, V] {
	t := new([pmapShards]map[K]V)
	if m.shards != nil {
		*t = *m.shards
	}
	m.shards, m.owned = t, new([pmapShards]bool)
	return m
}

// freeze ends the edit: the map is shared from now on.
func (m *pmap[K, V]) freeze() { m.owned = nil }

func (m *pmap[K, V]) own(i int) map[K]V {
	s := m.shards[i]
	if !m.owned[i] {
		s = maps.Clone(s) // nil stays nil
		m.owned[i] = true
	}
	if s == nil {
		s = make(map[K]V)
	}
	m.shards[i] = s
	return s
}

func (m *pmap[K, V]) set(k K, v V) {
	s := m.own(m.shard(k))
	if _, ok := s[k]; !ok {
		m.n++
	}
	s[k] = v
}

func (m *pmap[K, V]) del(k K) {
	i := m.shard(k)
	if _, ok := m.shards[i][k]; !ok {
		return
	}
	s := m.own(i)
	delete(s, k)
	m.n--
	if len(s) == 0 {
		m.shards[i] = nil // owned stays set: a later set makes a fresh map
	}
}

// Hashes for shard selection. They only spread keys over shards (each
// shard is a Go map with its own seeded hash), so they need to be fast and
// well mixed, not collision resistant.
var pmapSeed = maphash.MakeSeed()

func hashString(s string) uint64 { return maphash.String(pmapSeed, s) }

func hashKey(k Key) uint64 {
	return mix(hashString(k.Namespace) ^ hashString(k.Name)*0x9e3779b97f4a7c15)
}

func hashAddr(a netip.Addr) uint64 {
	b := a.As16()
	return mix(binary.LittleEndian.Uint64(b[:8])*0x9e3779b97f4a7c15 ^ binary.LittleEndian.Uint64(b[8:]))
}

func hashAddrPort(ap netip.AddrPort) uint64 {
	return mix(hashAddr(ap.Addr()) ^ uint64(ap.Port()))
}

func hashServicePort(k servicePortKey) uint64 { return mix(hashKey(k.svc) ^ hashString(k.port)) }

// mix is the finaliser of SplitMix64: every input bit reaches the top bits
// that pick the shard.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
