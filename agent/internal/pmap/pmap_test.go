package pmap

import (
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
)

func hashInt(i int) uint64 { return Mix(uint64(i)) }

// TestEditAndDiff edits a map through many versions at random and checks
// every version against a plain map, that older versions never change,
// and that Diff between any two versions reports exactly the keys whose
// value differs.
func TestEditAndDiff(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	var versions []Map[int, int]
	var want []map[int]int
	m, plain := New[int, int](hashInt), map[int]int{}
	for range 200 {
		m = m.Edit()
		for range 1 + rnd.IntN(20) {
			k := rnd.IntN(2000)
			if rnd.IntN(3) == 0 {
				m.Del(k)
				delete(plain, k)
			} else {
				m.Set(k, rnd.IntN(5))
				plain[k] = m.Lookup(k)
			}
		}
		m.Freeze()
		versions = append(versions, m)
		want = append(want, maps.Clone(plain))
	}
	for i := range versions {
		if err := versions[i].Check(); err != nil {
			t.Fatalf("version %d: %v", i, err)
		}
		got := maps.Collect(versions[i].All())
		if !maps.Equal(got, want[i]) || versions[i].Len() != len(want[i]) {
			t.Fatalf("version %d holds %v, want %v", i, got, want[i])
		}
	}
	for range 300 {
		i, j := rnd.IntN(len(versions)), rnd.IntN(len(versions))
		var got []int
		versions[j].Diff(&versions[i], func(a, b int) bool { return a == b }, func(k int) { got = append(got, k) })
		var exp []int
		for k := range 2000 {
			a, okA := want[i][k]
			b, okB := want[j][k]
			if okA != okB || a != b {
				exp = append(exp, k)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, exp) {
			t.Fatalf("Diff(%d -> %d) = %v, want %v", i, j, got, exp)
		}
	}
	var empty Map[int, int]
	var all []int
	versions[len(versions)-1].Diff(&empty, func(a, b int) bool { return a == b }, func(k int) { all = append(all, k) })
	if len(all) != len(want[len(want)-1]) {
		t.Fatalf("Diff from the zero Map reported %d keys, want %d", len(all), len(want[len(want)-1]))
	}
}

// An edit that writes nothing shares the version's shard table (a
// snapshot's untouched maps cost no copy), a deletion of a missing key is
// no write, and a write to a frozen map panics rather than change a
// published version.
func TestEditWithoutWritesSharesTheTable(t *testing.T) {
	e := New[int, int](hashInt).Edit()
	e.Del(1) // on an empty map
	e.Freeze()
	if e.shards != nil || e.Len() != 0 {
		t.Fatal("deleting from an empty map wrote to it")
	}
	m := New[int, int](hashInt).Edit()
	for i := range 100 {
		m.Set(i, i)
	}
	m.Freeze()
	n := m.Edit()
	n.Del(1000)
	n.Freeze()
	if n.shards != m.shards {
		t.Error("an edit without writes copied the shard table")
	}
	n = n.Edit()
	n.Set(1, 2)
	n.Freeze()
	if n.shards == m.shards || m.Lookup(1) != 1 || n.Lookup(1) != 2 {
		t.Error("a write did not copy the table, or changed the version it came from")
	}
	var got []int
	n.Diff(&m, func(a, b int) bool { return a == b }, func(k int) { got = append(got, k) })
	if !slices.Equal(got, []int{1}) {
		t.Errorf("Diff = %v, want [1]", got)
	}
	defer func() {
		if recover() == nil {
			t.Error("Set on a frozen map did not panic")
		}
	}()
	m.Set(5, 5)
}
