package proxy

import (
	"net/netip"
	"regexp"
	"testing"
	"time"
)

func TestBalancerPowerOfTwo(t *testing.T) {
	eps := []Endpoint{
		{Addr: netip.MustParseAddrPort("10.0.0.1:80")},
		{Addr: netip.MustParseAddrPort("10.0.0.2:80")},
		{Addr: netip.MustParseAddrPort("10.0.0.3:80")},
	}
	var b balancer
	// With two endpoints both are always drawn, so the less loaded wins:
	// held connections alternate exactly.
	var releases []func()
	counts := map[int]int{}
	for range 10 {
		i, rel := b.pick(eps[:2])
		counts[i]++
		releases = append(releases, rel)
	}
	if counts[0] != 5 || counts[1] != 5 {
		t.Fatalf("two endpoints, 10 held picks: %v, want 5/5", counts)
	}
	for _, rel := range releases {
		rel()
	}
	if len(b.inflight) != 0 {
		t.Fatalf("in-flight map not emptied after release: %v", b.inflight)
	}
	// An overloaded endpoint is only chosen when both draws hit it, which
	// cannot happen (draws are distinct): it gets nothing while others
	// are idle.
	b.inflight[eps[2].Addr] = 1000
	for range 300 {
		i, rel := b.pick(eps)
		if i == 2 {
			t.Fatal("picked the endpoint with 1000 connections over idle ones")
		}
		rel()
	}
	// One endpoint: always it.
	if i, rel := b.pick(eps[:1]); i != 0 {
		t.Fatalf("single endpoint: picked %d", i)
	} else {
		rel()
	}
}

func TestConnectHeader(t *testing.T) {
	w := &Workload{Namespace: "shop", Name: "cart-1"}
	h := connectHeader(&Flow{Workload: w, Src: netip.MustParseAddrPort("10.1.2.3:5555")})
	if got := h.Get("Forwarded"); got != "for=10.1.2.3" {
		t.Errorf("Forwarded = %q", got)
	}
	if got := h.Get("Baggage"); got != "k8s.namespace.name=shop,k8s.pod.name=cart-1" {
		t.Errorf("Baggage = %q", got)
	}
	tp := h.Get("Traceparent")
	if !regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-00$`).MatchString(tp) {
		t.Errorf("Traceparent = %q, not W3C version 00", tp)
	}
	if tp == connectHeader(&Flow{Workload: w}).Get("Traceparent") {
		t.Error("two connections got the same trace ID")
	}
	if got := forwardedFor(netip.MustParseAddr("fd00::1")); got != `for="[fd00::1]"` {
		t.Errorf("IPv6 Forwarded = %q", got)
	}
	if got := forwardedFor(netip.MustParseAddr("::ffff:10.0.0.1")); got != "for=10.0.0.1" {
		t.Errorf("mapped IPv4 Forwarded = %q", got)
	}
}

func TestWorkloadHasIP(t *testing.T) {
	w := &Workload{IPs: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")}}
	for ip, want := range map[string]bool{"10.0.0.5": true, "::ffff:10.0.0.5": true, "fd00::5": true, "10.0.0.6": false} {
		if got := w.HasIP(netip.MustParseAddr(ip)); got != want {
			t.Errorf("HasIP(%s) = %v", ip, got)
		}
	}
}

func TestPodSource(t *testing.T) {
	w := &Workload{IPs: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")}}
	for in, want := range map[string]string{
		"127.0.0.1:4000": "10.0.0.5:4000",
		"[::1]:4000":     "[fd00::5]:4000",
		"10.0.0.5:4000":  "10.0.0.5:4000",
	} {
		if got := podSource(w, netip.MustParseAddrPort(in)); got.String() != want {
			t.Errorf("podSource(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestLogLimiter(t *testing.T) {
	l := logLimiter{interval: time.Second}
	t0 := time.Unix(1000, 0)
	if ok, held := l.allow(t0); !ok || held != 0 {
		t.Fatalf("first line: %v %d", ok, held)
	}
	for i := range 5 {
		if ok, _ := l.allow(t0.Add(time.Duration(i) * 100 * time.Millisecond)); ok {
			t.Fatalf("line %d within the interval allowed", i)
		}
	}
	if ok, held := l.allow(t0.Add(time.Second)); !ok || held != 5 {
		t.Fatalf("after the interval: %v, held back %d, want true, 5", ok, held)
	}
	if ok, _ := l.allow(t0.Add(1500 * time.Millisecond)); ok {
		t.Fatal("allowed again within the new interval")
	}
}
