package main

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/demo"
)

// route is a request from one enrolled pod to another on the other node:
// mesh traffic, which must cross the underlay only inside HBONE.
type route struct {
	from, to lab.Pod
	v6       bool // to the destination's IPv6 address
}

// url is the route's HTTP URL with path.
func (r route) url(path string) string {
	ip := r.to.IP
	if r.v6 {
		ip = r.to.IP6
	}
	return "http://" + net.JoinHostPort(ip, "8080") + "/" + path
}

// underlayWatch captures the underlay for the length of one attack (issue
// 14: "zero plaintext payload may appear on the underlay in any of them")
// and checks afterwards that no payload marker crossed it in plaintext:
// the markers of mesh requests sent while the attack ran (meshTraffic)
// and any marker the attack registered (forbid). It sniffs one node's
// link to the underlay bridge, which every packet between the two nodes
// of the lab crosses.
type underlayWatch struct {
	t       *testing.T
	ctx     context.Context
	l       *lab.Lab
	link    string
	sn      *sniffer
	routes  []route
	markers []string
	sent    int
	ok      int
}

func watchUnderlay(t *testing.T, ctx context.Context, l *lab.Lab, link string, routes ...route) *underlayWatch {
	t.Helper()
	return &underlayWatch{t: t, ctx: ctx, l: l, link: link, sn: sniff(t, link), routes: routes}
}

// meshTraffic sends one HTTP request with a fresh marker in its path (the
// server echoes it back) on each of routes, or on every route of the
// watch if none are given, and returns how many were answered. An attack
// that kills an agent makes them fail: then they must fail closed, which
// check verifies like the rest.
func (w *underlayWatch) meshTraffic(routes ...route) int {
	w.t.Helper()
	if len(routes) == 0 {
		routes = w.routes
	}
	ok := 0
	for _, r := range routes {
		marker := fmt.Sprintf("NODEMESH-UNDERLAY-%s-%d", r.from.Name, time.Now().UnixNano())
		w.markers = append(w.markers, marker)
		w.sent++
		if _, out, err := demo.Get(w.ctx, w.l, r.from.Key(), r.url(marker)); err != nil {
			w.t.Logf("mesh request %s -> %s during the attack: %v %s", r.from.Key(), r.to.Key(), err, firstN(string(out), 200))
			continue
		}
		ok++
	}
	w.ok += ok
	return ok
}

// forbid adds a marker that must not cross the underlay in plaintext.
func (w *underlayWatch) forbid(marker string) { w.markers = append(w.markers, marker) }

// check ends the capture and fails the test if a marker crossed the
// underlay in plaintext, or if no HBONE frame crossed it at all (then the
// capture proved nothing).
func (w *underlayWatch) check() {
	w.t.Helper()
	frames := w.sn.stop()
	if !tcpPortSeen(frames, 15008) && !tcp6PortSeen(frames, 15008) {
		w.t.Errorf("underlay %s: no HBONE (port 15008) in %d frames captured during the attack: the plaintext check proves nothing", w.link, len(frames))
	}
	leaked := 0
	for _, m := range w.markers {
		if contains(frames, []byte(m)) {
			w.t.Errorf("underlay %s: payload marker %q crossed in plaintext during the attack", w.link, m)
			leaked++
		}
	}
	if leaked == 0 {
		w.t.Logf("underlay %s: %d frames, HBONE seen, none of %d payload markers in plaintext (%d of %d mesh requests answered)",
			w.link, len(frames), len(w.markers), w.ok, w.sent)
	}
}

// plaintextSeen is the capture's positive control: a request with a
// marker from a pod outside the mesh to a pod on the other node crosses
// the underlay in plaintext, and the sniffer must see it there, or the
// absence of mesh markers proves nothing.
func plaintextSeen(t *testing.T, ctx context.Context, l *lab.Lab, link string, from, to lab.Pod) {
	t.Helper()
	sn := sniff(t, link)
	marker := fmt.Sprintf("NODEMESH-PLAIN-CONTROL-%d", time.Now().UnixNano())
	if _, out, err := demo.Get(ctx, l, from.Key(), "http://"+to.IP+":8080/"+marker); err != nil {
		t.Fatalf("plaintext control %s -> %s: %v %s", from.Key(), to.Key(), err, out)
	}
	frames := sn.stop()
	if !contains(frames, []byte(marker)) {
		t.Fatalf("the sniffer on %s did not see a plaintext marker from %s to %s in %d frames: the underlay checks would prove nothing", link, from.Key(), to.Key(), len(frames))
	}
}
