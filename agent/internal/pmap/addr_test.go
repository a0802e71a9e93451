package pmap

import (
	"net/netip"
	"slices"
	"testing"
	"unsafe"
)

// An AddrMap keys by address exactly as a Map[netip.Addr, V] does, and
// gives the addresses back as they were set.
func TestAddrMap(t *testing.T) {
	if n := unsafe.Sizeof([16]byte{}); n >= unsafe.Sizeof(netip.Addr{}) {
		t.Fatalf("a key is %d bytes, no smaller than a netip.Addr", n)
	}
	v4, v6 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")
	mapped, zoned := netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("fe80::1%eth0")
	m := NewAddrMap[int]().Edit()
	m.Set(v4, 1)
	m.Set(v6, 2)
	m.Set(mapped, 3)
	m.Set(zoned, 4)
	m.Freeze()
	for a, want := range map[netip.Addr]int{v4: 1, v6: 2, mapped: 3, zoned: 4, netip.MustParseAddr("fe80::1"): 0, {}: 0} {
		if got := m.Lookup(a); got != want {
			t.Errorf("%v looks up %d, want %d", a, got, want)
		}
	}
	if _, ok := m.Get(netip.MustParseAddr("10.0.0.2")); ok {
		t.Error("an absent address is present")
	}
	var got []netip.Addr
	for a := range m.All() {
		got = append(got, a)
	}
	slices.SortFunc(got, netip.Addr.Compare)
	if want := []netip.Addr{v4, mapped, v6, zoned}; !slices.Equal(got, want) {
		t.Errorf("All yields %v", got)
	}
	n := m.Edit()
	n.Del(v6)
	n.Del(zoned)
	n.Set(netip.MustParseAddr("10.0.0.3"), 3)
	n.Set(mapped, 5)
	n.Freeze()
	if m.Lookup(mapped) != 3 || m.Lookup(zoned) != 4 || m.Len() != 4 {
		t.Error("editing a copy changed the original")
	}
	var changed []netip.Addr
	n.Diff(&m, func(a, b int) bool { return a == b }, func(a netip.Addr) { changed = append(changed, a) })
	slices.SortFunc(changed, netip.Addr.Compare)
	if want := []netip.Addr{netip.MustParseAddr("10.0.0.3"), mapped, v6, zoned}; !slices.Equal(changed, want) {
		t.Errorf("Diff reports %v, want %v", changed, want)
	}
	if err := n.Check(); err != nil || n.Len() != 3 {
		t.Errorf("check: %v, len %d", err, n.Len())
	}
}
