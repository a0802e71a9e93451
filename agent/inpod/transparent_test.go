package inpod

import (
	"context"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

const testDeliverMark = 0x4e4d053a

func TestPrivTransparentDelivery(t *testing.T) {
	privtest.Root(t)
	ctx := context.Background()
	ns := netns(t, "tx", "10.212.2.2/24", "fd00:212:2::2/64")
	v4, v6 := netip.MustParseAddr("10.212.2.2"), netip.MustParseAddr("fd00:212:2::2")

	// Without the pod's routing the application's SYN-ACK goes to the
	// foreign address and the delivery never completes.
	if err := ProbeTransparent(ctx, ns, v4, testDeliverMark); err == nil {
		t.Fatal("transparent delivery worked before SetupTransparent: the probe cannot fail")
	} else {
		t.Logf("before setup: %v", err)
	}
	if err := SetupTransparent(ns, testDeliverMark, true); err != nil {
		t.Fatal(err)
	}
	if err := SetupTransparent(ns, testDeliverMark, true); err != nil {
		t.Fatalf("setting up a second time (an agent restart): %v", err)
	}
	for _, ip := range []netip.Addr{v4, v6} {
		if err := ProbeTransparent(ctx, ns, ip, testDeliverMark); err != nil {
			t.Errorf("%s: %v", ip, err)
		}
	}
	out, err := exec.Command("ip", "-n", ns[len("/var/run/netns/"):], "rule", "show").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "fwmark 0x4e4d053a lookup 20045") {
		t.Errorf("ip rule in the pod: %v\n%s", err, out)
	}

	// An application on a real port sees the foreign peer; a closed port
	// is refused at once (fwmark_reflect brings the RST back).
	ln, err := ListenTCP(ctx, ns, "tcp4", "10.212.2.2:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := TransparentDialer{Netns: ns, Mark: testDeliverMark}
	peer := netip.MustParseAddr("10.9.8.7")
	c, err := d.DialContext(ctx, netip.AddrPortFrom(peer, 1234), netip.MustParseAddrPort("10.212.2.2:8080"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if got := netip.MustParseAddrPort(a.RemoteAddr().String()); got.Addr() != peer || got.Port() == 1234 {
		t.Errorf("application saw %s, want %s", a.RemoteAddr(), peer)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Write([]byte("y")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := c.Read(b); err != nil || b[0] != 'y' {
		t.Errorf("reply from the application: %q %v", b, err)
	}
	a.Close()
	c.Close()
	if _, err := d.DialContext(ctx, netip.AddrPortFrom(peer, 1234), netip.MustParseAddrPort("10.212.2.2:8081")); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("closed port: %v, want connection refused", err)
	}
	if _, err := d.DialContext(ctx, netip.AddrPortFrom(v6, 0), netip.MustParseAddrPort("10.212.2.2:8080")); err == nil {
		t.Error("dialing IPv4 from an IPv6 source succeeded")
	}
}
