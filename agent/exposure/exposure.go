// Package exposure is the agent's exposure ledger: the connections and
// bytes that left enrolled pods in plaintext (their destination was not
// meshed) and that reached enrolled pods in plaintext (PERMISSIVE inbound),
// per namespace and node, as Prometheus counters and as a windowed report
// with the top source/destination pairs. The report also answers the STRICT
// dry run: which plaintext connections to a namespace's enrolled pods a
// STRICT PeerAuthentication would have refused.
//
// Memory is bounded: the window is a ring of fixed-duration buckets, and
// each bucket keeps at most MaxPairs distinct pairs (the rest are counted in
// an overflow entry).
package exposure

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Directions of plaintext exposure.
const (
	// Outbound: a connection left an enrolled pod in plaintext.
	Outbound = "outbound"
	// Inbound: a connection reached an enrolled pod in plaintext.
	Inbound = "inbound"
)

// Event is one closed plaintext connection involving an enrolled pod.
type Event struct {
	Direction string // Outbound or Inbound
	// Src and Dst are namespace/name of pods, or an IP when not a pod.
	Src, Dst     string
	SrcNamespace string // "" when not a pod
	DstNamespace string // "" when not a pod
	// DstEnrolled: the destination is an enrolled pod (a STRICT
	// PeerAuthentication in its namespace would have refused this).
	DstEnrolled bool
	Bytes       int64 // both directions
}

// Config configures a Ledger.
type Config struct {
	Node string
	// Window is the longest report window; Bucket its granularity
	// (defaults 1h and 1m).
	Window, Bucket time.Duration
	// MaxPairs bounds distinct pairs per bucket (default 1000).
	MaxPairs   int
	Registerer prometheus.Registerer // nil: no metrics
	Now        func() time.Time      // nil: time.Now
}

type pairKey struct {
	dir, src, dst, srcNS, dstNS string
	dstEnrolled                 bool
}

type tally struct{ conns, bytes int64 }

type bucket struct {
	start time.Time
	pairs map[pairKey]*tally
}

// Ledger records plaintext exposure. It is safe for concurrent use.
type Ledger struct {
	cfg   Config
	conns *prometheus.CounterVec
	bytes *prometheus.CounterVec

	mu      sync.Mutex
	buckets []bucket // ring, indexed by bucket number mod len
}

// overflow is the pair that absorbs a full bucket's new pairs.
const overflow = "(other)"

// New returns a ledger and registers its counters.
func New(cfg Config) (*Ledger, error) {
	cfg.Window = cmp.Or(cfg.Window, time.Hour)
	cfg.Bucket = cmp.Or(cfg.Bucket, time.Minute)
	cfg.MaxPairs = cmp.Or(cfg.MaxPairs, 1000)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Bucket <= 0 || cfg.Window < cfg.Bucket || cfg.MaxPairs < 1 {
		return nil, fmt.Errorf("creating the exposure ledger: window %s must be at least one bucket %s (> 0) and MaxPairs %d at least 1", cfg.Window, cfg.Bucket, cfg.MaxPairs)
	}
	n := int(cfg.Window/cfg.Bucket) + 1
	if n > 10000 {
		return nil, fmt.Errorf("creating the exposure ledger: window %s in buckets of %s is %d buckets; use larger buckets (at most 10000)", cfg.Window, cfg.Bucket, n)
	}
	l := &Ledger{cfg: cfg, buckets: make([]bucket, n)}
	l.conns = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nodemesh_exposure_connections_total",
		Help: "Plaintext connections involving an enrolled pod: direction outbound (left it, destination not meshed) or inbound (reached it, PERMISSIVE)."},
		[]string{"direction", "namespace", "node"})
	l.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nodemesh_exposure_bytes_total",
		Help: "Bytes (both ways) of plaintext connections involving an enrolled pod, by direction."},
		[]string{"direction", "namespace", "node"})
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{l.conns, l.bytes} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("registering exposure metrics: %w", err)
			}
		}
	}
	return l, nil
}

// Record adds a closed plaintext connection.
func (l *Ledger) Record(e Event) {
	if e.Direction != Outbound && e.Direction != Inbound {
		return
	}
	if e.Bytes < 0 {
		e.Bytes = 0
	}
	// The enrolled pod's namespace: the source's on outbound, the
	// destination's on inbound.
	ns := e.SrcNamespace
	if e.Direction == Inbound {
		ns = e.DstNamespace
	}
	l.conns.WithLabelValues(e.Direction, ns, l.cfg.Node).Inc()
	l.bytes.WithLabelValues(e.Direction, ns, l.cfg.Node).Add(float64(e.Bytes))

	now := l.cfg.Now()
	k := pairKey{dir: e.Direction, src: e.Src, dst: e.Dst, srcNS: e.SrcNamespace, dstNS: e.DstNamespace, dstEnrolled: e.DstEnrolled}
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.bucketAt(now)
	t, ok := b.pairs[k]
	if !ok {
		if len(b.pairs) >= l.cfg.MaxPairs {
			k = pairKey{dir: e.Direction, src: overflow, dst: overflow}
			t = b.pairs[k]
		}
		if t == nil {
			t = &tally{}
			b.pairs[k] = t
		}
	}
	t.conns++
	t.bytes += e.Bytes
}

func (l *Ledger) bucketAt(now time.Time) *bucket {
	start := now.Truncate(l.cfg.Bucket)
	i := int((start.UnixNano() / int64(l.cfg.Bucket)) % int64(len(l.buckets)))
	b := &l.buckets[i]
	if !b.start.Equal(start) {
		// The slot held an older bucket: reuse it (capped map, so
		// memory stays bounded).
		b.start = start
		b.pairs = make(map[pairKey]*tally)
	}
	return b
}

// Pair is one source/destination pair of a report.
type Pair struct {
	Direction   string `json:"direction"`
	Src         string `json:"src"`
	Dst         string `json:"dst"`
	DstEnrolled bool   `json:"dstEnrolled"`
	Connections int64  `json:"connections"`
	Bytes       int64  `json:"bytes"`
}

// Totals are connection and byte counts.
type Totals struct {
	Connections int64 `json:"connections"`
	Bytes       int64 `json:"bytes"`
}

// Report is the ledger over a window.
type Report struct {
	Node   string    `json:"node"`
	Window string    `json:"window"`
	Since  time.Time `json:"since"`
	// ByNamespace: direction -> namespace of the enrolled pod -> totals.
	ByNamespace map[string]map[string]Totals `json:"byNamespace"`
	Total       map[string]Totals            `json:"total"` // by direction
	Top         []Pair                       `json:"top"`   // largest first, at most Options.Top
	// IfStrict is the STRICT dry run: set when asked for a namespace.
	IfStrict *DryRun `json:"ifStrict,omitempty"`
}

// DryRun lists the window's plaintext connections to enrolled pods of
// Namespace: a STRICT PeerAuthentication there would have refused them.
type DryRun struct {
	Namespace   string `json:"namespace"`
	Connections int64  `json:"connections"`
	Bytes       int64  `json:"bytes"`
	Pairs       []Pair `json:"pairs"`
}

// ReportOptions select a report.
type ReportOptions struct {
	Window   time.Duration // 0: the ledger's whole window
	Top      int           // 0: 10
	IfStrict string        // namespace for the STRICT dry run, "" for none
}

// ErrWindow is returned for a window longer than the ledger keeps.
var ErrWindow = errors.New("window longer than the ledger keeps")

// Report summarises the buckets that overlap the last o.Window.
func (l *Ledger) Report(o ReportOptions) (*Report, error) {
	if o.Window == 0 {
		o.Window = l.cfg.Window
	}
	if o.Window < 0 || o.Window > l.cfg.Window {
		return nil, fmt.Errorf("window %s: %w (the agent keeps %s)", o.Window, ErrWindow, l.cfg.Window)
	}
	o.Top = cmp.Or(o.Top, 10)
	now := l.cfg.Now()
	since := now.Add(-o.Window).Truncate(l.cfg.Bucket)
	r := &Report{Node: l.cfg.Node, Window: o.Window.String(), Since: since,
		ByNamespace: map[string]map[string]Totals{}, Total: map[string]Totals{}}
	sum := map[pairKey]tally{}
	l.mu.Lock()
	for _, b := range l.buckets {
		if b.pairs == nil || b.start.Before(since) || b.start.After(now) {
			continue
		}
		for k, t := range b.pairs {
			s := sum[k]
			s.conns += t.conns
			s.bytes += t.bytes
			sum[k] = s
		}
	}
	l.mu.Unlock()
	var pairs []Pair
	if o.IfStrict != "" {
		r.IfStrict = &DryRun{Namespace: o.IfStrict, Pairs: []Pair{}}
	}
	for k, t := range sum {
		ns := k.srcNS
		if k.dir == Inbound {
			ns = k.dstNS
		}
		add := func(x Totals) Totals { return Totals{x.Connections + t.conns, x.Bytes + t.bytes} }
		if r.ByNamespace[k.dir] == nil {
			r.ByNamespace[k.dir] = map[string]Totals{}
		}
		r.ByNamespace[k.dir][ns] = add(r.ByNamespace[k.dir][ns])
		r.Total[k.dir] = add(r.Total[k.dir])
		p := Pair{Direction: k.dir, Src: k.src, Dst: k.dst, DstEnrolled: k.dstEnrolled, Connections: t.conns, Bytes: t.bytes}
		pairs = append(pairs, p)
		if r.IfStrict != nil && k.dstEnrolled && k.dstNS == o.IfStrict {
			r.IfStrict.Connections += t.conns
			r.IfStrict.Bytes += t.bytes
			r.IfStrict.Pairs = append(r.IfStrict.Pairs, p)
		}
	}
	order := func(a, b Pair) int {
		return cmp.Or(cmp.Compare(b.Bytes, a.Bytes), cmp.Compare(b.Connections, a.Connections),
			cmp.Compare(a.Direction, b.Direction), cmp.Compare(a.Src, b.Src), cmp.Compare(a.Dst, b.Dst))
	}
	slices.SortFunc(pairs, order)
	if len(pairs) > o.Top {
		pairs = pairs[:o.Top]
	}
	r.Top = pairs
	if r.Top == nil {
		r.Top = []Pair{}
	}
	if r.IfStrict != nil {
		slices.SortFunc(r.IfStrict.Pairs, order)
	}
	return r, nil
}
