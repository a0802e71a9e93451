package pmap

import (
	"encoding/binary"
	"fmt"
	"iter"
	"maps"
	"net/netip"
)

// AddrMap is a Map keyed by IP address that stores an IPv4 or plain IPv6
// key as its 16 bytes instead of a netip.Addr (24 bytes: the address and a
// pointer to its zone and family): an address index of every pod in the
// cluster then costs 8 bytes less per slot of its shards' tables. Keys
// are netip.Addr values compared as ==, exactly as in a
// Map[netip.Addr, V]: the few that 16 bytes cannot tell apart from
// another (an IPv4-mapped IPv6 address, which would collide with its IPv4
// form, one with a zone, the zero Addr) live in a small map of their own,
// empty for pod and node addresses.
type AddrMap[V any] struct {
	m Map[[16]byte, V]
	// odd holds the other keys. It is never written once shared: Set and
	// Del replace it.
	odd map[netip.Addr]V
}

// NewAddrMap returns an empty AddrMap.
func NewAddrMap[V any]() AddrMap[V] { return AddrMap[V]{m: New[[16]byte, V](addrKeyHash)} }

// addrKey returns a's key and true, or false for an address kept in odd.
func addrKey(a netip.Addr) ([16]byte, bool) {
	if a.Is4() || a.Is6() && !a.Is4In6() && a.Zone() == "" {
		return a.As16(), true
	}
	return [16]byte{}, false
}

// keyAddr is the address of a key: an IPv4-mapped key is an IPv4 address,
// since IPv4-mapped IPv6 addresses are kept in odd.
func keyAddr(k [16]byte) netip.Addr {
	a := netip.AddrFrom16(k)
	if a.Is4In6() {
		return a.Unmap()
	}
	return a
}

// addrKeyHash is Addr over the key's bytes.
func addrKeyHash(b [16]byte) uint64 {
	return Mix(binary.LittleEndian.Uint64(b[:8])*0x9e3779b97f4a7c15 ^ binary.LittleEndian.Uint64(b[8:]))
}

// Get returns the value of a and whether it is present.
func (m *AddrMap[V]) Get(a netip.Addr) (V, bool) {
	if k, ok := addrKey(a); ok {
		return m.m.Get(k)
	}
	v, ok := m.odd[a]
	return v, ok
}

// Lookup is Get without the second result, for pointer values.
func (m *AddrMap[V]) Lookup(a netip.Addr) V {
	v, _ := m.Get(a)
	return v
}

// Len returns the number of entries.
func (m *AddrMap[V]) Len() int { return m.m.Len() + len(m.odd) }

// All yields every entry, in no particular order.
func (m *AddrMap[V]) All() iter.Seq2[netip.Addr, V] {
	return func(yield func(netip.Addr, V) bool) {
		for k, v := range m.m.All() {
			if !yield(keyAddr(k), v) {
				return
			}
		}
		for a, v := range m.odd {
			if !yield(a, v) {
				return
			}
		}
	}
}

// Edit is Map.Edit.
func (m AddrMap[V]) Edit() AddrMap[V] { return AddrMap[V]{m: m.m.Edit(), odd: m.odd} }

// Freeze is Map.Freeze.
func (m *AddrMap[V]) Freeze() { m.m.Freeze() }

// Set is Map.Set.
func (m *AddrMap[V]) Set(a netip.Addr, v V) {
	if k, ok := addrKey(a); ok {
		m.m.Set(k, v)
		return
	}
	odd := maps.Clone(m.odd)
	if odd == nil {
		odd = make(map[netip.Addr]V)
	}
	odd[a] = v
	m.odd = odd
}

// Del is Map.Del.
func (m *AddrMap[V]) Del(a netip.Addr) {
	if k, ok := addrKey(a); ok {
		m.m.Del(k)
		return
	}
	if _, ok := m.odd[a]; !ok {
		return
	}
	odd := maps.Clone(m.odd)
	delete(odd, a)
	if len(odd) == 0 {
		odd = nil
	}
	m.odd = odd
}

// Diff is Map.Diff.
func (m *AddrMap[V]) Diff(old *AddrMap[V], same func(a, b V) bool, changed func(netip.Addr)) {
	m.m.Diff(&old.m, same, func(k [16]byte) { changed(keyAddr(k)) })
	if sameMap(m.odd, old.odd) {
		return
	}
	for a, va := range old.odd {
		if vb, ok := m.odd[a]; !ok || !same(va, vb) {
			changed(a)
		}
	}
	for a := range m.odd {
		if _, ok := old.odd[a]; !ok {
			changed(a)
		}
	}
}

// Check is Map.Check, and checks that every odd key is one.
func (m *AddrMap[V]) Check() error {
	if err := m.m.Check(); err != nil {
		return err
	}
	for a := range m.odd {
		if _, ok := addrKey(a); ok {
			return fmt.Errorf("%v kept apart, but has a 16-byte key", a)
		}
	}
	return nil
}
