// Package hist is a log-linear latency histogram in the manner of HDR
// histograms: values below 256 are counted exactly, larger values in 128
// buckets per power of two, so every recorded value is known to within
// 1/128 (0.8 %) of itself. Memory is fixed (a few tens of kB) whatever the
// range, recording is a few instructions, and histograms of several
// connections or runs merge exactly by adding counts.
package hist

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"sort"
)

const (
	subBits = 7
	sub     = 1 << subBits // buckets per power of two
	// exact is the first value that no longer has a bucket of its own.
	exact = 2 * sub
	// buckets covers every non-negative int64.
	buckets = (63-(subBits+1))*sub + exact
)

// Hist counts non-negative int64 values (nanoseconds in this project).
// The zero value is ready to use. It is not safe for concurrent use: give
// each goroutine its own and Merge them.
type Hist struct {
	counts   []uint64
	n        uint64
	min, max int64
	sum      float64
}

// index returns the bucket of v (v >= 0).
func index(v int64) int {
	if v < exact {
		return int(v)
	}
	shift := bits.Len64(uint64(v)) - (subBits + 1)
	return shift*sub + int(uint64(v)>>uint(shift))
}

// bounds returns the smallest and largest value that land in bucket i.
func bounds(i int) (lo, hi int64) {
	if i < exact {
		return int64(i), int64(i)
	}
	shift := i/sub - 1
	s := int64(i - shift*sub)
	lo = s << uint(shift)
	hi = lo + (int64(1) << uint(shift)) - 1
	return lo, hi
}

// Record counts v once. Negative values are counted as 0: a clock that
// stepped backwards must not corrupt the histogram.
func (h *Hist) Record(v int64) { h.RecordN(v, 1) }

// RecordN counts v n times.
func (h *Hist) RecordN(v int64, n uint64) {
	if n == 0 {
		return
	}
	if v < 0 {
		v = 0
	}
	if h.counts == nil {
		h.counts = make([]uint64, buckets)
	}
	h.counts[index(v)] += n
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if h.n == 0 || v > h.max {
		h.max = v
	}
	h.n += n
	h.sum += float64(v) * float64(n)
}

// Count is the number of recorded values.
func (h *Hist) Count() uint64 { return h.n }

// Min and Max are the exact extremes recorded (0 when empty).
func (h *Hist) Min() int64 { return h.min }

// Max is the largest value recorded.
func (h *Hist) Max() int64 { return h.max }

// Mean is the exact mean of the recorded values.
func (h *Hist) Mean() float64 {
	if h.n == 0 {
		return 0
	}
	return h.sum / float64(h.n)
}

// Quantile returns the value at quantile q (0 <= q <= 1): the midpoint of
// the bucket holding the ceil(q*n)-th smallest value, clamped to the exact
// minimum and maximum. It is 0 for an empty histogram. Quantiles are
// monotonic in q.
func (h *Hist) Quantile(q float64) int64 {
	if h.n == 0 {
		return 0
	}
	if math.IsNaN(q) || q <= 0 {
		return h.min
	}
	if q >= 1 {
		return h.max
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range h.counts {
		if c == 0 {
			continue
		}
		seen += c
		if seen >= rank {
			lo, hi := bounds(i)
			v := lo + (hi-lo)/2
			return min(max(v, h.min), h.max)
		}
	}
	return h.max
}

// Merge adds o's counts to h.
func (h *Hist) Merge(o *Hist) {
	if o == nil || o.n == 0 {
		return
	}
	if h.counts == nil {
		h.counts = make([]uint64, buckets)
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	if h.n == 0 || o.max > h.max {
		h.max = o.max
	}
	h.n += o.n
	h.sum += o.sum
}

// Snapshot is the serialisable form of a Hist: only non-empty buckets, as
// [bucket index, count] pairs, plus the exact extremes and sum.
type Snapshot struct {
	Buckets [][2]uint64 `json:"buckets"`
	Min     int64       `json:"min"`
	Max     int64       `json:"max"`
	Sum     float64     `json:"sum"`
}

// Snapshot returns h in serialisable form.
func (h *Hist) Snapshot() Snapshot {
	s := Snapshot{Min: h.min, Max: h.max, Sum: h.sum, Buckets: [][2]uint64{}}
	for i, c := range h.counts {
		if c != 0 {
			s.Buckets = append(s.Buckets, [2]uint64{uint64(i), c})
		}
	}
	return s
}

// FromSnapshot rebuilds a Hist, refusing snapshots that could not have
// come from Snapshot (they arrive from another process).
func FromSnapshot(s Snapshot) (*Hist, error) {
	h := &Hist{}
	if len(s.Buckets) == 0 {
		return h, nil
	}
	if s.Min < 0 || s.Max < s.Min {
		return nil, fmt.Errorf("histogram snapshot: bad extremes min=%d max=%d", s.Min, s.Max)
	}
	h.counts = make([]uint64, buckets)
	idx := make([]int, 0, len(s.Buckets))
	for _, b := range s.Buckets {
		if b[0] >= buckets {
			return nil, fmt.Errorf("histogram snapshot: bucket %d out of range (max %d)", b[0], buckets-1)
		}
		if b[1] == 0 {
			return nil, errors.New("histogram snapshot: empty bucket listed")
		}
		if h.counts[b[0]] != 0 {
			return nil, fmt.Errorf("histogram snapshot: bucket %d listed twice", b[0])
		}
		if h.n+b[1] < h.n {
			return nil, errors.New("histogram snapshot: counts overflow")
		}
		h.counts[b[0]] = b[1]
		h.n += b[1]
		idx = append(idx, int(b[0]))
	}
	sort.Ints(idx)
	if lo, _ := bounds(idx[0]); s.Min < lo || index(s.Min) != idx[0] {
		return nil, fmt.Errorf("histogram snapshot: min %d is not in the lowest bucket", s.Min)
	}
	if index(s.Max) != idx[len(idx)-1] {
		return nil, fmt.Errorf("histogram snapshot: max %d is not in the highest bucket", s.Max)
	}
	h.min, h.max, h.sum = s.Min, s.Max, s.Sum
	return h, nil
}
