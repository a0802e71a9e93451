// Package pmap is the sharded copy-on-write map that the agent's immutable
// snapshots (agent/state, agent/policy) share between versions.
//
// A Map's entries are spread over a fixed number of shards (plain Go
// maps). A snapshot's maps are frozen once it is published; Edit returns an
// editable copy for the next snapshot, which shares every shard until Set
// or Del first touches it. The cost of a change is then one shard
// (size/Shards entries) plus the shard table, not the whole map, while a
// lookup stays one hash and one Go map lookup. Since unchanged shards stay
// shared, Diff finds what changed between two versions of a map by
// comparing only the shards that differ.
package pmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"iter"
	"maps"
	"net/netip"
	"reflect"
)

// Map is a sharded copy-on-write map. The zero Map is empty and frozen;
// use New for one that can be edited. A frozen Map is safe for concurrent
// reads; an editable one belongs to its editor.
type Map[K comparable, V any] struct {
	hash   func(K) uint64
	shards *[Shards]map[K]V
	n      int
	// editing is set from Edit to Freeze. owned marks the shards this edit
	// has already copied, and is nil until its first write: until then the
	// edit shares its shard table with the version it came from too, so
	// that a snapshot's maps no change touched cost nothing.
	editing bool
	owned   *[Shards]bool
}

// 256 shards: at 100,000 entries a shard holds about 400, so copying one
// costs microseconds, and the table is 2 KiB per map per version.
const (
	bits = 8
	// Shards is the number of shards of every Map.
	Shards = 1 << bits
)

// New returns an empty Map whose keys are spread by hash, which must be
// well mixed in its top bits (see Mix).
func New[K comparable, V any](hash func(K) uint64) Map[K, V] { return Map[K, V]{hash: hash} }

func (m *Map[K, V]) shard(k K) int { return int(m.hash(k) >> (64 - bits)) }

// Get returns the value of k and whether it is present.
func (m *Map[K, V]) Get(k K) (V, bool) {
	if m.shards == nil {
		var zero V
		return zero, false
	}
	v, ok := m.shards[m.shard(k)][k]
	return v, ok
}

// Lookup is Get without the second result, for pointer values.
func (m *Map[K, V]) Lookup(k K) V {
	v, _ := m.Get(k)
	return v
}

// Len returns the number of entries.
func (m *Map[K, V]) Len() int { return m.n }

// All yields every entry, in no particular order.
func (m *Map[K, V]) All() iter.Seq2[K, V] {
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

// Edit returns an editable copy of m for the next version; m itself is
// unchanged, and stays so whatever is done to the copy.
func (m Map[K, V]) Edit() Map[K, V] {
	m.editing, m.owned = true, nil
	return m
}

// Freeze ends the edit: the map is shared from now on.
func (m *Map[K, V]) Freeze() { m.editing, m.owned = false, nil }

// own returns shard i for writing: the edit's own copy of the shard table
// on the first write, then its own copy of the shard on the shard's first.
func (m *Map[K, V]) own(i int) map[K]V {
	if !m.editing {
		panic("pmap: write to a frozen Map")
	}
	if m.owned == nil {
		t := new([Shards]map[K]V)
		if m.shards != nil {
			*t = *m.shards
		}
		m.shards, m.owned = t, new([Shards]bool)
	}
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

// Set sets k to v. The map must be editable.
func (m *Map[K, V]) Set(k K, v V) {
	s := m.own(m.shard(k))
	if _, ok := s[k]; !ok {
		m.n++
	}
	s[k] = v
}

// Del removes k, if present. The map must be editable.
func (m *Map[K, V]) Del(k K) {
	i := m.shard(k)
	if m.shards == nil {
		return
	}
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

// Diff calls changed for every key whose presence or value (by same)
// differs between old and m, two versions of one map (m edited from old,
// directly or over several versions). Shards the two share are skipped, so
// the cost is that of the shards that differ. Keys may be reported in any
// order, each once.
func (m *Map[K, V]) Diff(old *Map[K, V], same func(a, b V) bool, changed func(K)) {
	if m.shards == old.shards {
		return
	}
	var none [Shards]map[K]V
	a, b := &none, &none
	if old.shards != nil {
		a = old.shards
	}
	if m.shards != nil {
		b = m.shards
	}
	for i := range a {
		sa, sb := a[i], b[i]
		if sameMap(sa, sb) {
			continue
		}
		for k, va := range sa {
			if vb, ok := sb[k]; !ok || !same(va, vb) {
				changed(k)
			}
		}
		for k := range sb {
			if _, ok := sa[k]; !ok {
				changed(k)
			}
		}
	}
}

// sameMap reports whether a and b are one map (or both nil).
func sameMap[K comparable, V any](a, b map[K]V) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}

// Check verifies the map's own bookkeeping, for tests: it is frozen, its
// count is right, and every entry is in the shard its hash picks.
func (m *Map[K, V]) Check() error {
	var errs []error
	if m.editing || m.owned != nil {
		errs = append(errs, errors.New("not frozen"))
	}
	n := 0
	if m.shards != nil {
		for i, sh := range m.shards {
			for k := range sh {
				n++
				if m.shard(k) != i {
					errs = append(errs, fmt.Errorf("%v in shard %d, hashes to %d", k, i, m.shard(k)))
				}
			}
		}
	}
	if n != m.n {
		errs = append(errs, fmt.Errorf("len %d, holds %d", m.n, n))
	}
	return errors.Join(errs...)
}

// Hashes for shard selection. They only spread keys over shards (each
// shard is a Go map with its own seeded hash), so they need to be fast and
// well mixed, not collision resistant.
var seed = maphash.MakeSeed()

// String hashes a string.
func String(s string) uint64 { return maphash.String(seed, s) }

// Addr hashes an address.
func Addr(a netip.Addr) uint64 {
	b := a.As16()
	return Mix(binary.LittleEndian.Uint64(b[:8])*0x9e3779b97f4a7c15 ^ binary.LittleEndian.Uint64(b[8:]))
}

// AddrPort hashes an address and port.
func AddrPort(ap netip.AddrPort) uint64 { return Mix(Addr(ap.Addr()) ^ uint64(ap.Port())) }

// Mix is the finaliser of SplitMix64: every input bit reaches the top bits
// that pick the shard. Combine hashes with it.
func Mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
