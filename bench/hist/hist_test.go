package hist

import (
	"encoding/json"
	"math/rand/v2"
	"sort"
	"testing"
)

func TestBucketsCoverEveryValue(t *testing.T) {
	prevHi := int64(-1)
	for i := 0; i < buckets; i++ {
		lo, hi := bounds(i)
		if lo != prevHi+1 {
			t.Fatalf("bucket %d starts at %d, previous ended at %d", i, lo, prevHi)
		}
		if hi < lo {
			t.Fatalf("bucket %d: hi %d < lo %d", i, hi, lo)
		}
		if index(lo) != i || index(hi) != i {
			t.Fatalf("bucket %d [%d,%d]: index(lo)=%d index(hi)=%d", i, lo, hi, index(lo), index(hi))
		}
		// Relative width stays within 1/128 of the bucket's values.
		if lo >= exact && float64(hi-lo+1)/float64(lo) > 1.0/sub+1e-12 {
			t.Fatalf("bucket %d [%d,%d] wider than 1/%d", i, lo, hi, sub)
		}
		prevHi = hi
		if hi == 1<<63-1 {
			if i != buckets-1 {
				t.Fatalf("max int64 in bucket %d, want the last (%d)", i, buckets-1)
			}
			return
		}
	}
	t.Fatalf("buckets end at %d, before max int64", prevHi)
}

func TestQuantilesAgainstSort(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 2, 10, 1000, 20000} {
		var h Hist
		vals := make([]int64, n)
		for i := range vals {
			// Long-tailed, like latency: mostly 50-500 µs, some ms.
			v := int64(50_000 + r.ExpFloat64()*100_000)
			if r.IntN(100) == 0 {
				v *= 40
			}
			vals[i] = v
			h.Record(v)
		}
		sort.Slice(vals, func(i, j int) bool { return vals[i] < vals[j] })
		if h.Count() != uint64(n) || h.Min() != vals[0] || h.Max() != vals[n-1] {
			t.Fatalf("n=%d: count/min/max %d/%d/%d, want %d/%d/%d", n, h.Count(), h.Min(), h.Max(), n, vals[0], vals[n-1])
		}
		prev := int64(-1)
		for _, q := range []float64{0, 0.1, 0.5, 0.9, 0.99, 0.999, 1} {
			got := h.Quantile(q)
			rank := int(q*float64(n)+0.999999999) - 1
			if rank < 0 {
				rank = 0
			}
			want := vals[rank]
			if d := float64(got-want) / float64(want); d > 1.0/sub || d < -1.0/sub {
				t.Errorf("n=%d q=%v: got %d, exact %d (error %.3f%%)", n, q, got, want, d*100)
			}
			if got < prev {
				t.Errorf("n=%d: quantile %v = %d below the previous %d", n, q, got, prev)
			}
			prev = got
		}
	}
}

func TestEmptyAndNegative(t *testing.T) {
	var h Hist
	if h.Quantile(0.5) != 0 || h.Mean() != 0 || h.Count() != 0 {
		t.Fatal("empty histogram should report zeros")
	}
	h.Record(-5)
	if h.Min() != 0 || h.Quantile(0.99) != 0 {
		t.Fatalf("negative value should count as 0, min=%d", h.Min())
	}
}

func TestMergeEqualsRecordingAll(t *testing.T) {
	var a, b, all Hist
	for i := int64(0); i < 5000; i++ {
		v := i * i % 1_000_003
		all.Record(v)
		if i%3 == 0 {
			a.Record(v)
		} else {
			b.Record(v)
		}
	}
	a.Merge(&b)
	a.Merge(nil)
	a.Merge(&Hist{})
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999} {
		if a.Quantile(q) != all.Quantile(q) {
			t.Errorf("q=%v: merged %d, all %d", q, a.Quantile(q), all.Quantile(q))
		}
	}
	if a.Count() != all.Count() || a.Min() != all.Min() || a.Max() != all.Max() || a.Mean() != all.Mean() {
		t.Error("merged summary differs")
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	var h Hist
	for i := int64(1); i < 100000; i *= 3 {
		h.RecordN(i, uint64(i%7+1))
	}
	b, err := json.Marshal(h.Snapshot())
	if err != nil {
		t.Fatal(err)
	}
	var s Snapshot
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	g, err := FromSnapshot(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []float64{0, 0.5, 0.99, 1} {
		if g.Quantile(q) != h.Quantile(q) {
			t.Errorf("q=%v: %d after round trip, %d before", q, g.Quantile(q), h.Quantile(q))
		}
	}
	e, err := FromSnapshot(Snapshot{})
	if err != nil || e.Count() != 0 {
		t.Fatalf("empty snapshot: %v", err)
	}
}

func TestFromSnapshotRefusesBadInput(t *testing.T) {
	for name, s := range map[string]Snapshot{
		"bucket out of range": {Buckets: [][2]uint64{{buckets, 1}}, Min: 1, Max: 1},
		"zero count":          {Buckets: [][2]uint64{{3, 0}}, Min: 3, Max: 3},
		"duplicate":           {Buckets: [][2]uint64{{3, 1}, {3, 1}}, Min: 3, Max: 3},
		"min outside":         {Buckets: [][2]uint64{{3, 1}}, Min: 9, Max: 9},
		"max below min":       {Buckets: [][2]uint64{{3, 1}}, Min: 3, Max: 2},
		"negative":            {Buckets: [][2]uint64{{3, 1}}, Min: -1, Max: 3},
	} {
		if _, err := FromSnapshot(s); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func BenchmarkRecord(b *testing.B) {
	b.ReportAllocs()
	var h Hist
	h.Record(1)
	for i := 0; b.Loop(); i++ {
		h.Record(int64(i) * 7919)
	}
}
