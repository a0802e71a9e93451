package redirect

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

// deliver plays the agent's inbound delivery: DialInbound from src to the
// application at dst, one line each way; it returns the app's reply.
func deliver(t *testing.T, ep *EnrolledPod, src, dst netip.AddrPort) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	plain := func() (net.Conn, error) { return nil, fmt.Errorf("plain dial used") }
	c, err := ep.DialInbound(ctx, src, dst, plain)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	line, err := exchangeLine(c, "x", 5*time.Second)
	if err != nil {
		return "read: " + err.Error()
	}
	return line
}

// TestPrivTransparentDelivery: an inbound connection reaches the pod's
// application with the peer's address as source (issue 14, item 7), on
// both families, through the pod's real sk_lookup program; connections
// from outside the pod are still steered to the agent.
func TestPrivTransparentDelivery(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	b, c := tp.pod("b"), tp.pod("c")
	if err := ProbeTransparentDelivery(); errors.Is(err, ebpf.ErrNotSupported) {
		t.Skipf("kernel feature missing: %v (TestPrivTransparentDeliveryOff covers the fallback)", err)
	}
	capt := loadCaptureT(t, tp.config())
	if on, why := capt.Transparent(); !on {
		t.Fatalf("transparent delivery unavailable although the kernel probe passed: %s", why)
	}
	app := serveLines(t, listenIn(t, b, "tcp", "[::]:8080"), "APPB")
	ep := enrollT(t, capt, b)
	agentServe(t, capt, ep)
	if ok, why := ep.SourcePreserved(); !ok {
		t.Fatalf("pod's delivery not transparent: %s", why)
	}

	for _, tc := range []struct{ src, dst, want string }{
		{"10.211.0.3:40000", "10.211.0.2:8080", "APPB local=10.211.0.2:8080 remote=10.211.0.3:"},
		{"[fd00:211::3]:40000", "[fd00:211::2]:8080", "APPB local=[fd00:211::2]:8080 remote=[fd00:211::3]:"},
		// A peer the pod has no route to: the reply still comes back.
		{"10.99.1.1:40000", "10.211.0.2:8080", "APPB local=10.211.0.2:8080 remote=10.99.1.1:"},
	} {
		got := deliver(t, ep, netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst))
		if !strings.HasPrefix(got, tc.want) || strings.Contains(got, ":40000 ") {
			t.Errorf("delivery from %s to %s: app answered %q, want %q (and a port other than the peer's)", tc.src, tc.dst, got, tc.want)
		}
	}
	// A closed port is refused at once, not after a timeout.
	start := time.Now()
	if got := deliver(t, ep, netip.MustParseAddrPort("10.211.0.3:40000"), netip.MustParseAddrPort("10.211.0.2:9999")); !strings.Contains(got, "refused") {
		t.Errorf("delivery to a closed port: %q, want connection refused", got)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("refusal took %v", d)
	}
	// The loopback exemption in sk_lookup is for the pod's own traffic:
	// from another pod, the same port still reaches the agent only.
	wantPrefix(t, "v4 inbound from a pod", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "INBOUND local=10.211.0.2:8080 remote=10.211.0.3:")
	wantPrefix(t, "v6 inbound from a pod", appDial(t, c, "tcp", "[fd00:211::2]:8080", "x"), "INBOUND local=[fd00:211::2]:8080 remote=[fd00:211::3]:")
	if n := app.count(); n != 3 {
		t.Errorf("the app received %d connections, want the 3 deliveries", n)
	}
	if got := capt.deliveries[0].Load(); got != 4 {
		t.Errorf("transparent deliveries counted: %d, want 4", got)
	}
	// Loopback sources and mismatched families use the plain dial.
	for _, src := range []string{"127.0.0.1:1", "[fd00:211::3]:1"} {
		if got := deliver(t, ep, netip.MustParseAddrPort(src), netip.MustParseAddrPort("10.211.0.2:8080")); !strings.Contains(got, "plain dial used") {
			t.Errorf("delivery from %s: %q, want the plain dial", src, got)
		}
	}
}

// TestPrivProbeTransparentDelivery: the feature probe that tests use to
// expect the agent's behaviour on their kernel agrees with what Load
// decides on it.
func TestPrivProbeTransparentDelivery(t *testing.T) {
	privtest.Root(t)
	probe := ProbeTransparentDelivery()
	if probe != nil && !errors.Is(probe, ebpf.ErrNotSupported) {
		t.Fatalf("the probe could not tell: %v", probe)
	}
	tp := newTopo(t)
	capt := loadCaptureT(t, tp.config())
	if on, why := capt.Transparent(); on != (probe == nil) {
		t.Fatalf("Load: transparent %v (%s); probe: %v", on, why, probe)
	}
	t.Logf("transparent delivery on this kernel: %v", probe == nil)
}

func TestPrivTransparentDeliveryOff(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	b := tp.pod("b")
	cfg := tp.config()
	cfg.NoTransparent = true
	capt := loadCaptureT(t, cfg)
	ep := enrollT(t, capt, b)
	if ok, why := ep.SourcePreserved(); ok || why != "disabled by configuration" {
		t.Errorf("SourcePreserved with NoTransparent: %v %q", ok, why)
	}
	if got := deliver(t, ep, netip.MustParseAddrPort("10.211.0.3:1"), netip.MustParseAddrPort("10.211.0.2:8080")); !strings.Contains(got, "plain dial used") {
		t.Errorf("delivery with NoTransparent: %q, want the plain dial", got)
	}
	if st := capt.Status(); st.Transparent || len(st.Pods) != 1 || st.Pods[0].SourcePreserved {
		t.Errorf("status: %+v", st)
	}
	// The fallback delivers for real: the agent's plain dial (inside the
	// pod, with the capture bypass mark, from the pod's own address) passes
	// this program, which has no loopback check, and reaches the app on
	// both families, while the same ports from another pod still reach
	// the agent only. Without the program's "pod to itself" pass the
	// fallback would steer its own deliveries back to the agent.
	c := tp.pod("c")
	serveLines(t, listenIn(t, b, "tcp", "[::]:8080"), "APPB")
	agentServe(t, capt, ep)
	plainDeliver := func(dst netip.AddrPort) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		d := &inpod.Dialer{Netns: b.netns, Mark: capt.Mark()}
		conn, err := ep.DialInbound(ctx, netip.MustParseAddrPort("10.211.0.3:1"), dst, func() (net.Conn, error) {
			return d.DialContext(ctx, "tcp", dst.String())
		})
		if err != nil {
			return "error: " + err.Error()
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintln(conn, "x")
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			return "read: " + err.Error()
		}
		return strings.TrimSpace(line)
	}
	for _, tc := range []struct{ dst, want string }{
		{"10.211.0.2:8080", "APPB local=10.211.0.2:8080 remote=10.211.0.2:"},
		{"[fd00:211::2]:8080", "APPB local=[fd00:211::2]:8080 remote=[fd00:211::2]:"},
	} {
		if got := plainDeliver(netip.MustParseAddrPort(tc.dst)); !strings.HasPrefix(got, tc.want) {
			t.Errorf("fallback delivery to %s: app answered %q, want %q", tc.dst, got, tc.want)
		}
	}
	wantPrefix(t, "v4 inbound from a pod, fallback program", appDial(t, c, "tcp", "10.211.0.2:8080", "x"), "INBOUND local=10.211.0.2:8080 remote=10.211.0.3:")
	wantPrefix(t, "v6 inbound from a pod, fallback program", appDial(t, c, "tcp", "[fd00:211::2]:8080", "x"), "INBOUND local=[fd00:211::2]:8080 remote=[fd00:211::3]:")
	if got := capt.deliveries[1].Load(); got < 3 {
		t.Errorf("deliveries from the pod's own address counted: %d, want at least 3", got)
	}
}
