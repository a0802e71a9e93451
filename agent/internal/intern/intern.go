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
	"strconv"
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

// Ports interns lists of ports whose elements are each a name, a number
// and a protocol (a container's declared ports, in the state's or the
// policy's type), keyed by those three. Make it with NewPorts; it is safe
// for concurrent use.
type Ports[E any] struct {
	fields func(E) (name string, number int64, protocol string)
	tab    Slices[E]
}

// NewPorts returns a table of port lists whose elements fields describes.
func NewPorts[E any](fields func(E) (name string, number int64, protocol string)) *Ports[E] {
	return &Ports[E]{fields: fields}
}

// Make returns the shared list equal to ports (nil for none), as
// Slices.Make does.
func (t *Ports[E]) Make(ports []E) []E {
	if len(ports) == 0 {
		return nil
	}
	// Each string is preceded by its length, so two lists have one key
	// exactly when their elements are equal.
	b := make([]byte, 0, 24*len(ports))
	for _, p := range ports {
		name, number, protocol := t.fields(p)
		b = strconv.AppendInt(b, int64(len(name)), 10)
		b = append(b, ':')
		b = append(b, name...)
		b = strconv.AppendInt(b, number, 10)
		b = append(b, '/')
		b = strconv.AppendInt(b, int64(len(protocol)), 10)
		b = append(b, ':')
		b = append(b, protocol...)
	}
	return t.tab.Make(string(b), ports)
}

// Len returns the number of entries, live or awaiting their cleanup, for
// tests.
func (t *Ports[E]) Len() int { return t.tab.Len() }

// Integer is an integer type whose values Ints keys lists by.
type Integer interface {
	~int | ~int8 | ~int16 | ~int32 | ~int64 | ~uint | ~uint8 | ~uint16 | ~uint32 | ~uint64
}

// Ints interns lists of integers (a pod's probe ports) by their values.
// The zero Ints is ready to use and safe for concurrent use.
type Ints[E Integer] struct{ tab Slices[E] }

// Make returns the shared list equal to s (nil for none), as Slices.Make
// does.
func (t *Ints[E]) Make(s []E) []E {
	if len(s) == 0 {
		return nil
	}
	b := make([]byte, 0, 6*len(s))
	for _, e := range s {
		b = strconv.AppendInt(b, int64(e), 10) // int64(e) is one-to-one for every Integer type
		b = append(b, ',')
	}
	return t.tab.Make(string(b), s)
}

// Len returns the number of entries, live or awaiting their cleanup, for
// tests.
func (t *Ints[E]) Len() int { return t.tab.Len() }
