package pmap

// Fresh empties m, a plain Go map that collects the changes between two
// snapshots, and returns it for the next ones. A Go map never shrinks and
// ranging over it costs its capacity, not its length: a map that once held
// an initial sync (tens of thousands of entries) would make every later
// build walk the whole table for its few changes, so such a map is dropped
// and a new one returned instead of clearing it.
func Fresh[K comparable, V any](m map[K]V) map[K]V {
	if m == nil || len(m) > freshMax {
		return make(map[K]V)
	}
	clear(m)
	return m
}

// freshMax is the most entries a map Fresh clears for reuse may hold.
const freshMax = 1024
