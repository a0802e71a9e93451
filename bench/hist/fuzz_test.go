package hist

import (
	"encoding/json"
	"testing"
)

// FuzzFromSnapshot: a snapshot from another process either is refused or
// gives a histogram whose quantiles are monotonic and within its extremes.
func FuzzFromSnapshot(f *testing.F) {
	var h Hist
	for _, v := range []int64{0, 5, 300, 1e6, 7e9} {
		h.Record(v)
	}
	seed, _ := json.Marshal(h.Snapshot())
	f.Add(seed)
	f.Add([]byte(`{"buckets":[[7295,1]],"min":9223372036854775807,"max":9223372036854775807}`))
	f.Add([]byte(`{"buckets":[[1,18446744073709551615],[2,1]],"min":1,"max":2}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var s Snapshot
		if json.Unmarshal(data, &s) != nil {
			return
		}
		g, err := FromSnapshot(s)
		if err != nil {
			return
		}
		prev := g.Quantile(0)
		for _, q := range []float64{0.1, 0.5, 0.9, 0.99, 0.999, 1} {
			v := g.Quantile(q)
			if v < prev || v < g.Min() || v > g.Max() {
				t.Fatalf("quantile %v = %d (previous %d, range %d..%d)", q, v, prev, g.Min(), g.Max())
			}
			prev = v
		}
	})
}
