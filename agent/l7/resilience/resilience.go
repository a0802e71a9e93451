// Package resilience implements TrafficPolicy (traffic.nodemesh.io): fault
// injection (a delay and an abort for a share of requests) and local rate
// limiting (a token bucket per destination Service, optionally per source
// identity), applied by the client's agent before a request is routed.
//
// Compile turns the API objects into a Set, one Policy per Service (the
// oldest policy wins a conflict); Policy.Fault draws the fault for one
// request; Limiter keeps the token buckets, bounded in number. Everything
// takes its randomness and clock from the caller, so it is deterministic
// under test.
package resilience

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/time/rate"

	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/l7/v1alpha1"
)

// Ref names a TrafficPolicy.
type Ref struct {
	Namespace, Name string
}

func (r Ref) String() string { return "TrafficPolicy " + r.Namespace + "/" + r.Name }

// Problem is a TrafficPolicy that Compile refused or that lost a conflict.
type Problem struct {
	Ref Ref
	Err error
}

func (p Problem) Error() string { return p.Ref.String() + ": " + p.Err.Error() }

// Delay is a compiled fault delay.
type Delay struct {
	Fraction float64 // 0..1
	Duration time.Duration
}

// Abort is a compiled fault abort.
type Abort struct {
	Fraction   float64 // 0..1
	HTTPStatus int     // 0: derived from GRPCStatus for HTTP requests
	GRPCStatus int     // 0: derived from HTTPStatus for gRPC requests
}

// Limit is a compiled rate limit.
type Limit struct {
	PerSecond float64
	Burst     int
	PerSource bool
}

// Policy is what applies to the requests to one Service.
type Policy struct {
	Ref   Ref
	Delay *Delay
	Abort *Abort
	Limit *Limit
}

// Set is the compiled TrafficPolicies of a cluster, immutable.
type Set struct {
	byService map[route.ServiceKey]*Policy
	problems  []Problem
}

// For returns the policy for a Service, or nil.
func (s *Set) For(svc route.ServiceKey) *Policy { return s.byService[svc] }

// Problems lists the refused and conflicting policies.
func (s *Set) Problems() []Problem { return s.problems }

// Services lists the Services a policy applies to, sorted.
func (s *Set) Services() []route.ServiceKey {
	out := make([]route.ServiceKey, 0, len(s.byService))
	for k := range s.byService {
		out = append(out, k)
	}
	slices.SortFunc(out, func(a, b route.ServiceKey) int { return cmp.Compare(a.String(), b.String()) })
	return out
}

// String says what the policy does, for listings.
func (p *Policy) String() string {
	var parts []string
	if d := p.Delay; d != nil {
		parts = append(parts, fmt.Sprintf("delay %g%% %s", d.Fraction*100, d.Duration))
	}
	if a := p.Abort; a != nil {
		st := ""
		if a.HTTPStatus != 0 {
			st += fmt.Sprintf(" http %d", a.HTTPStatus)
		}
		if a.GRPCStatus != 0 {
			st += fmt.Sprintf(" grpc %d", a.GRPCStatus)
		}
		parts = append(parts, fmt.Sprintf("abort %g%%%s", a.Fraction*100, st))
	}
	if l := p.Limit; l != nil {
		per := "per Service"
		if l.PerSource {
			per = "per source"
		}
		parts = append(parts, fmt.Sprintf("rate limit %g/s burst %d %s", l.PerSecond, l.Burst, per))
	}
	return strings.Join(parts, "; ")
}

// Compile builds the Set. An invalid policy is refused as a whole and does
// nothing: fault injection and rate limits only ever take traffic away, so
// the safe failure is to apply none of a policy that is not understood. When
// several policies target one Service, the oldest wins (then the first by
// namespace/name), as Gateway API policy attachment asks.
func Compile(tps []*v1alpha1.TrafficPolicy) *Set {
	s := &Set{byService: map[route.ServiceKey]*Policy{}}
	sorted := slices.Clone(tps)
	slices.SortStableFunc(sorted, func(a, b *v1alpha1.TrafficPolicy) int {
		return cmp.Or(a.CreationTimestamp.Time.Compare(b.CreationTimestamp.Time),
			cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, tp := range sorted {
		ref := Ref{tp.Namespace, tp.Name}
		p, targets, err := compile(tp)
		if err != nil {
			s.problems = append(s.problems, Problem{ref, err})
			continue
		}
		for _, svc := range targets {
			if old := s.byService[svc]; old != nil {
				s.problems = append(s.problems, Problem{ref, fmt.Errorf("the Service %s is already targeted by the older %s; this policy does not apply to it", svc, old.Ref)})
				continue
			}
			s.byService[svc] = p
		}
	}
	return s
}

func compile(tp *v1alpha1.TrafficPolicy) (*Policy, []route.ServiceKey, error) {
	spec := &tp.Spec
	if tp.Namespace == "" || tp.Name == "" {
		return nil, nil, errors.New("metadata.namespace and metadata.name are required")
	}
	if len(spec.TargetRefs) == 0 {
		return nil, nil, errors.New("spec.targetRefs: at least one Service is required")
	}
	var targets []route.ServiceKey
	for i, t := range spec.TargetRefs {
		if (t.Group != "" && t.Group != "core") || t.Kind != "Service" || t.Name == "" {
			return nil, nil, fmt.Errorf("spec.targetRefs[%d]: want group \"\", kind Service and a name", i)
		}
		targets = append(targets, route.ServiceKey{Namespace: tp.Namespace, Name: t.Name})
	}
	if spec.Fault == nil && spec.RateLimit == nil {
		return nil, nil, errors.New("spec: set fault, rateLimit or both")
	}
	p := &Policy{Ref: Ref{tp.Namespace, tp.Name}}
	if f := spec.Fault; f != nil {
		if f.Delay == nil && f.Abort == nil {
			return nil, nil, errors.New("spec.fault: set delay, abort or both")
		}
		if d := f.Delay; d != nil {
			frac, err := fraction(d.Percentage)
			if err != nil {
				return nil, nil, fmt.Errorf("spec.fault.delay.percentage: %w", err)
			}
			dur, err := route.ParseDuration(d.FixedDelay)
			if err != nil {
				return nil, nil, fmt.Errorf("spec.fault.delay.fixedDelay: %w", err)
			}
			p.Delay = &Delay{Fraction: frac, Duration: dur}
		}
		if a := f.Abort; a != nil {
			frac, err := fraction(a.Percentage)
			if err != nil {
				return nil, nil, fmt.Errorf("spec.fault.abort.percentage: %w", err)
			}
			ab := &Abort{Fraction: frac, HTTPStatus: int(a.HTTPStatus)}
			if a.HTTPStatus != 0 && (a.HTTPStatus < 200 || a.HTTPStatus > 599) {
				return nil, nil, fmt.Errorf("spec.fault.abort.httpStatus %d: want 200-599", a.HTTPStatus)
			}
			if a.GRPCStatus != nil {
				if *a.GRPCStatus < 1 || *a.GRPCStatus > 16 {
					return nil, nil, fmt.Errorf("spec.fault.abort.grpcStatus %d: want 1-16", *a.GRPCStatus)
				}
				ab.GRPCStatus = int(*a.GRPCStatus)
			}
			if ab.HTTPStatus == 0 && ab.GRPCStatus == 0 {
				return nil, nil, errors.New("spec.fault.abort: set httpStatus, grpcStatus or both")
			}
			p.Abort = ab
		}
	}
	if rl := spec.RateLimit; rl != nil {
		if rl.RequestsPerSecond < 1 || rl.RequestsPerSecond > 1_000_000 {
			return nil, nil, fmt.Errorf("spec.rateLimit.requestsPerSecond %d: want 1-1000000", rl.RequestsPerSecond)
		}
		if rl.Burst < 0 || rl.Burst > 1_000_000 {
			return nil, nil, fmt.Errorf("spec.rateLimit.burst %d: want 0-1000000", rl.Burst)
		}
		burst := int(rl.Burst)
		if burst == 0 {
			burst = int(rl.RequestsPerSecond)
		}
		p.Limit = &Limit{PerSecond: float64(rl.RequestsPerSecond), Burst: burst, PerSource: rl.PerSource}
	}
	return p, targets, nil
}

func fraction(pct float64) (float64, error) {
	if math.IsNaN(pct) || pct < 0 || pct > 100 {
		return 0, fmt.Errorf("%v: want 0-100", pct)
	}
	return pct / 100, nil
}

// Fault is what fault injection does to one request.
type Fault struct {
	Delay time.Duration // 0: none
	// Abort is true when the request is answered without being sent, with
	// HTTPStatus (HTTP) or GRPCStatus (gRPC).
	Abort      bool
	HTTPStatus int
	GRPCStatus int
}

// Fault draws the fault for one request; float64 returns a uniform number
// in [0, 1) (math/rand/v2's Float64). Delay and abort are drawn
// independently, as in Istio.
func (p *Policy) Fault(float64 func() float64) Fault {
	var f Fault
	if p == nil {
		return f
	}
	if d := p.Delay; d != nil && d.Fraction > 0 && float64() < d.Fraction {
		f.Delay = d.Duration
	}
	if a := p.Abort; a != nil && a.Fraction > 0 && float64() < a.Fraction {
		f.Abort = true
		f.HTTPStatus, f.GRPCStatus = a.HTTPStatus, a.GRPCStatus
		if f.HTTPStatus == 0 {
			f.HTTPStatus = HTTPStatusForGRPC(a.GRPCStatus)
		}
		if f.GRPCStatus == 0 {
			f.GRPCStatus = GRPCStatusForHTTP(a.HTTPStatus)
		}
	}
	return f
}

// GRPCStatusForHTTP maps an HTTP status to a gRPC code as gRPC's HTTP
// mapping does (doc/http-grpc-status-mapping.md in grpc/grpc).
func GRPCStatusForHTTP(status int) int {
	switch status {
	case 400:
		return 13 // INTERNAL
	case 401:
		return 16 // UNAUTHENTICATED
	case 403:
		return 7 // PERMISSION_DENIED
	case 404:
		return 12 // UNIMPLEMENTED
	case 429, 502, 503, 504:
		return 14 // UNAVAILABLE
	}
	return 2 // UNKNOWN
}

// HTTPStatusForGRPC picks the HTTP status for a gRPC-only abort seen by a
// plain HTTP client.
func HTTPStatusForGRPC(code int) int {
	switch code {
	case 7:
		return 403
	case 8:
		return 429
	case 12:
		return 404
	case 14:
		return 503
	case 16:
		return 401
	case 4:
		return 504
	}
	return 500
}

// DefaultMaxBuckets bounds the token buckets a Limiter keeps.
const DefaultMaxBuckets = 10000

// Limiter keeps token buckets per (Service, source) key and limit. It is
// safe for concurrent use. When more than its bound are in use, the least
// recently used bucket is dropped: its key starts again with a full bucket,
// which can let a burst through but never blocks traffic wrongly.
type Limiter struct {
	buckets *lru.Cache[bucketKey, *rate.Limiter]
}

type bucketKey struct {
	svc    route.ServiceKey
	source string
	limit  Limit // a changed limit starts a new bucket
}

// NewLimiter returns a Limiter holding at most maxBuckets buckets
// (DefaultMaxBuckets when maxBuckets <= 0).
func NewLimiter(maxBuckets int) *Limiter {
	if maxBuckets <= 0 {
		maxBuckets = DefaultMaxBuckets
	}
	c, err := lru.New[bucketKey, *rate.Limiter](maxBuckets)
	if err != nil {
		panic(err) // only for a size <= 0, excluded above
	}
	return &Limiter{buckets: c}
}

// Allow takes a token for a request from source (its SPIFFE ID) to svc
// under lim at time now; false means the request is over the limit (429).
// A nil lim allows everything.
func (l *Limiter) Allow(svc route.ServiceKey, source string, lim *Limit, now time.Time) bool {
	if lim == nil {
		return true
	}
	k := bucketKey{svc: svc, limit: *lim}
	if lim.PerSource {
		k.source = source
	}
	b, ok := l.buckets.Get(k)
	if !ok {
		nb := rate.NewLimiter(rate.Limit(lim.PerSecond), lim.Burst)
		// Two first requests may race here; the loser's bucket is dropped
		// and it uses the winner's.
		if prev, found, _ := l.buckets.PeekOrAdd(k, nb); found {
			b = prev
		} else {
			b = nb
		}
	}
	return b.AllowN(now, 1)
}

// Len returns the number of buckets held.
func (l *Limiter) Len() int { return l.buckets.Len() }
