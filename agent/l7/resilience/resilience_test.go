package resilience

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/l7/v1alpha1"
)

func policy(t *testing.T, doc string) *v1alpha1.TrafficPolicy {
	t.Helper()
	var tp v1alpha1.TrafficPolicy
	if err := yaml.UnmarshalStrict([]byte(doc), &tp); err != nil {
		t.Fatalf("decoding TrafficPolicy: %v", err)
	}
	return &tp
}

var reviews = route.ServiceKey{Namespace: "shop", Name: "reviews"}

func TestCompile(t *testing.T) {
	chaos := policy(t, `
metadata: {name: chaos, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}, {group: core, kind: Service, name: ratings}]
  fault:
    delay: {percentage: 12.5, fixedDelay: 500ms}
    abort: {percentage: 5, httpStatus: 503}
  rateLimit: {requestsPerSecond: 100, burst: 200, perSource: true}
`)
	newer := policy(t, `
metadata: {name: newer, namespace: shop, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}, {group: "", kind: Service, name: details}]
  rateLimit: {requestsPerSecond: 5}
`)
	s := Compile([]*v1alpha1.TrafficPolicy{newer, chaos})
	p := s.For(reviews)
	if p == nil || p.Ref.Name != "chaos" {
		t.Fatalf("reviews: %+v, want the older policy chaos", p)
	}
	if *p.Delay != (Delay{Fraction: 0.125, Duration: 500 * time.Millisecond}) {
		t.Errorf("delay = %+v", *p.Delay)
	}
	if *p.Abort != (Abort{Fraction: 0.05, HTTPStatus: 503}) {
		t.Errorf("abort = %+v", *p.Abort)
	}
	if *p.Limit != (Limit{PerSecond: 100, Burst: 200, PerSource: true}) {
		t.Errorf("limit = %+v", *p.Limit)
	}
	if d := s.For(route.ServiceKey{Namespace: "shop", Name: "details"}); d == nil || d.Limit.Burst != 5 {
		t.Errorf("details: %+v, want newer with burst defaulted to 5", d)
	}
	if probs := s.Problems(); len(probs) != 1 || !strings.Contains(probs[0].Error(), "already targeted") {
		t.Errorf("problems = %v, want the conflict on reviews", probs)
	}
}

func TestCompileRefuses(t *testing.T) {
	for _, doc := range []string{
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}]}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [], rateLimit: {requestsPerSecond: 1}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: apps, kind: Deployment, name: x}], rateLimit: {requestsPerSecond: 1}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], fault: {}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], fault: {delay: {percentage: 101, fixedDelay: 1s}}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], fault: {delay: {percentage: 10, fixedDelay: 1.5s}}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], fault: {abort: {percentage: 10}}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], fault: {abort: {percentage: 10, httpStatus: 99}}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], fault: {abort: {percentage: 10, grpcStatus: 17}}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], rateLimit: {requestsPerSecond: 0}}}`,
		`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], rateLimit: {requestsPerSecond: 1, burst: -1}}}`,
	} {
		s := Compile([]*v1alpha1.TrafficPolicy{policy(t, doc)})
		if len(s.Problems()) != 1 || s.For(route.ServiceKey{Namespace: "s", Name: "x"}) != nil {
			t.Errorf("%s: problems %v; the policy must be refused and apply to nothing", doc, s.Problems())
		}
	}
}

func TestFault(t *testing.T) {
	grpc := int32(14)
	p, _, err := compile(policy(t, `
metadata: {name: f, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  fault:
    delay: {percentage: 10, fixedDelay: 2s}
    abort: {percentage: 30, httpStatus: 503}
`))
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	const n = 20000
	delayed, aborted := 0, 0
	for range n {
		f := p.Fault(rng.Float64)
		if f.Delay == 2*time.Second {
			delayed++
		}
		if f.Abort {
			aborted++
			if f.HTTPStatus != 503 || f.GRPCStatus != 14 {
				t.Fatalf("abort = %+v, want 503 and UNAVAILABLE", f)
			}
		}
	}
	if delayed < n*8/100 || delayed > n*12/100 {
		t.Errorf("%d of %d delayed, want about 10%%", delayed, n)
	}
	if aborted < n*27/100 || aborted > n*33/100 {
		t.Errorf("%d of %d aborted, want about 30%%", aborted, n)
	}
	always := &Policy{Abort: &Abort{Fraction: 1, GRPCStatus: int(grpc)}}
	if f := always.Fault(rng.Float64); !f.Abort || f.HTTPStatus != 503 || f.GRPCStatus != 14 {
		t.Errorf("gRPC-only abort = %+v, want HTTP 503 for plain clients", f)
	}
	never := &Policy{Delay: &Delay{Fraction: 0, Duration: time.Second}}
	if f := never.Fault(func() float64 { return 0 }); f.Delay != 0 {
		t.Errorf("0%% delay fired: %+v", f)
	}
	var none *Policy
	if f := none.Fault(rng.Float64); f != (Fault{}) {
		t.Errorf("nil policy fault = %+v", f)
	}
}

func TestLimiter(t *testing.T) {
	l := NewLimiter(2)
	lim := &Limit{PerSecond: 10, Burst: 5}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	allowed := 0
	for range 20 {
		if l.Allow(reviews, "spiffe://a", lim, now) {
			allowed++
		}
	}
	if allowed != 5 {
		t.Errorf("at one instant %d allowed, want the burst of 5", allowed)
	}
	// 10 per second: one token every 100ms.
	if !l.Allow(reviews, "spiffe://b", lim, now.Add(100*time.Millisecond)) {
		t.Error("a token did not come back after 100ms")
	}
	if l.Allow(reviews, "spiffe://b", lim, now.Add(100*time.Millisecond)) {
		t.Error("two tokens after 100ms")
	}
	// One bucket per Service unless perSource: source b shared a's bucket.
	if l.Len() != 1 {
		t.Errorf("%d buckets, want 1", l.Len())
	}
	per := &Limit{PerSecond: 1, Burst: 1, PerSource: true}
	if !l.Allow(reviews, "spiffe://a", per, now) || !l.Allow(reviews, "spiffe://b", per, now) {
		t.Error("per-source buckets are not separate")
	}
	if l.Allow(reviews, "spiffe://a", per, now) {
		t.Error("per-source bucket of a not spent")
	}
	if l.Len() != 2 {
		t.Errorf("%d buckets, want at most 2 (the bound)", l.Len())
	}
	if !l.Allow(reviews, "x", nil, now) {
		t.Error("no limit must allow")
	}
}

func FuzzCompile(f *testing.F) {
	f.Add(`{metadata: {name: a, namespace: s}, spec: {targetRefs: [{group: "", kind: Service, name: x}], fault: {delay: {percentage: 10, fixedDelay: 1s}}, rateLimit: {requestsPerSecond: 1}}}`)
	f.Fuzz(func(t *testing.T, doc string) {
		var tp v1alpha1.TrafficPolicy
		if yaml.Unmarshal([]byte(doc), &tp) != nil {
			return
		}
		s := Compile([]*v1alpha1.TrafficPolicy{&tp})
		for _, tr := range tp.Spec.TargetRefs {
			if p := s.For(route.ServiceKey{Namespace: tp.Namespace, Name: tr.Name}); p != nil {
				p.Fault(func() float64 { return 0 })
				NewLimiter(1).Allow(reviews, "", p.Limit, time.Unix(0, 0))
			}
		}
	})
}
