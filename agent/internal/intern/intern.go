// Package intern shares one copy of equal immutable slices between the
// values that hold them, the way package unique does for strings: the
// agent keeps a pod of every pod in the cluster, and the pods of one
// workload declare the same ports, so one backing array serves them all.
//
// A table holds its entries weakly: an entry lives while some slice of it
// is reachable, and a cleanup removes it once it is garbage, so churn
// cannot grow a table.
package intern

import (
	"runtime"
	"sync"
	"unsafe"
	"weak"
)

// Slices interns slices of E by a key that identifies their contents. The
// zero Slices is ready to use and safe for concurrent use.
type Slices[E any] struct {
	mu sync.Mutex
	m  map[string]weak.Pointer[E] // the first element of each shared array
}

// Make returns the shared slice that key identifies, or, when there is
// none, a copy of s with an exact capacity, which becomes the shared one.
// key must identify s's contents, its length included: two slices with
// one key are interchangeable. Neither s nor the result may be modified
// afterwards. An empty s gives nil.
func (t *Slices[E]) Make(key string, s []E) []E {
	if len(s) == 0 {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if wp, ok := t.m[key]; ok {
		if p := wp.Value(); p != nil {
			// p is the first element of an array of len(s) elements (the
			// key fixes the length), alive as long as this slice is.
			return unsafe.Slice(p, len(s))
		}
	}
	c := make([]E, len(s))
	copy(c, s)
	if t.m == nil {
		t.m = make(map[string]weak.Pointer[E])
	}
	t.m[key] = weak.Make(&c[0])
	runtime.AddCleanup(&c[0], func(key string) {
		t.mu.Lock()
		defer t.mu.Unlock()
		if wp, ok := t.m[key]; ok && wp.Value() == nil {
			delete(t.m, key)
		}
	}, key)
	return c
}

// Len returns the number of entries, live or awaiting their cleanup, for
// tests.
func (t *Slices[E]) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}
