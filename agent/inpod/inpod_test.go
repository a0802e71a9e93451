package inpod

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

func TestDoRejectsNonNamespace(t *testing.T) {
	f := t.TempDir() + "/notns"
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	called := false
	err := Do(f, func() error { called = true; return nil })
	if err == nil || !strings.Contains(err.Error(), "not a network namespace") || called {
		t.Errorf("Do on a regular file: err %v, fn called %v", err, called)
	}
	if err := Do("/nonexistent/nmtinpod", func() error { return nil }); err == nil {
		t.Error("Do on a missing path succeeded")
	}
}

func TestOpenRejectsBadInput(t *testing.T) {
	ctx := context.Background()
	if _, err := Open(ctx, "", []netip.Addr{netip.MustParseAddr("10.0.0.1")}); err == nil {
		t.Error("Open without a namespace path succeeded")
	}
	for _, ips := range [][]netip.Addr{nil, {netip.MustParseAddr("127.0.0.1")}, {netip.MustParseAddr("0.0.0.0")}, {{}}} {
		if _, err := Open(ctx, "/proc/self/ns/net", ips); err == nil {
			t.Errorf("Open with pod IPs %v succeeded", ips)
		}
	}
}

// netns creates a network namespace named nmtinpod-<pid>-<name> with lo up
// and the given addresses on a dummy interface.
func netns(t *testing.T, name string, addrs ...string) string {
	t.Helper()
	ns := fmt.Sprintf("nmtinpod-%d-%s", os.Getpid(), name)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	exec.Command("ip", "netns", "del", ns).Run()
	run("netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	run("-n", ns, "link", "set", "lo", "up")
	run("-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	run("-n", ns, "link", "set", "d1", "up")
	for _, a := range addrs {
		run("-n", ns, "addr", "add", a, "dev", "d0", "nodad")
	}
	run("-n", ns, "link", "set", "d0", "up")
	return "/var/run/netns/" + ns
}

func TestPrivOpenListenersAndDial(t *testing.T) {
	privtest.Root(t)
	ctx := context.Background()
	ns := netns(t, "pod", "10.212.0.2/24", "fd00:212::2/64")
	ips := []netip.Addr{netip.MustParseAddr("10.212.0.2"), netip.MustParseAddr("fd00:212::2")}
	ls, err := Open(ctx, ns, ips)
	if err != nil {
		t.Fatal(err)
	}
	defer ls.Close()

	want := []string{"127.0.0.1:15001", "[::1]:15001", "127.0.0.1:15006", "[::1]:15006", "10.212.0.2:15008", "[fd00:212::2]:15008"}
	var got []string
	for _, g := range [][]*net.TCPListener{ls.Outbound, ls.Inbound, ls.HBONE} {
		for _, ln := range g {
			got = append(got, ln.Addr().String())
			proto := rawOpt(t, ln, unix.SOL_SOCKET, unix.SO_PROTOCOL)
			if proto != unix.IPPROTO_TCP {
				t.Errorf("%s: protocol %d, want plain TCP (MPTCP listeners cannot enter a sockmap)", ln.Addr(), proto)
			}
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("listeners %v, want %v", got, want)
	}
	cookie, err := Cookie(ns)
	if err != nil {
		t.Fatal(err)
	}
	self, err := Cookie("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if cookie != ls.Cookie || cookie == self {
		t.Errorf("cookies: listeners %d, Cookie(ns) %d, own namespace %d", ls.Cookie, cookie, self)
	}
	// The listeners live in the pod namespace, not ours.
	if c, err := net.Dial("tcp", "127.0.0.1:15001"); err == nil {
		c.Close()
		t.Error("15001 is reachable from the agent's own namespace")
	}

	// Dialing from inside the pod, with the bypass mark.
	d := Dialer{Netns: ns, Mark: 0x4e4d0539}
	conn, err := d.DialContext(ctx, "tcp", "127.0.0.1:15006")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if m := rawOpt(t, conn, unix.SOL_SOCKET, unix.SO_MARK); uint32(m) != d.Mark {
		t.Errorf("dialed socket mark %#x, want %#x", m, d.Mark)
	}
	acc, err := ls.Inbound[0].Accept()
	if err != nil {
		t.Fatal(err)
	}
	acc.Close()
	if c, err := NetnsCookie(conn); err != nil || c != cookie {
		t.Errorf("dialed socket's namespace cookie %d (%v), want %d", c, err, cookie)
	}
	// The calling goroutine's namespace is untouched.
	if after, _ := Cookie("/proc/self/ns/net"); after != self {
		t.Errorf("own namespace cookie changed from %d to %d", self, after)
	}
	if err := ls.Close(); err != nil {
		t.Errorf("closing listeners: %v", err)
	}
}

func TestPrivOpenNeedsIPv6Loopback(t *testing.T) {
	privtest.Root(t)
	ns := netns(t, "nov6", "10.212.1.2/24")
	if out, err := exec.Command("ip", "netns", "exec", ns[len("/var/run/netns/"):], "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1").CombinedOutput(); err != nil {
		t.Fatalf("disabling IPv6: %v %s", err, out)
	}
	ls, err := Open(context.Background(), ns, []netip.Addr{netip.MustParseAddr("10.212.1.2")})
	if err != nil {
		t.Fatalf("IPv4-only pod: %v", err)
	}
	if len(ls.Outbound) != 1 || len(ls.Inbound) != 1 {
		t.Errorf("IPv4-only pod got %d outbound and %d inbound listeners, want 1 each", len(ls.Outbound), len(ls.Inbound))
	}
	ls.Close()
	if _, err := Open(context.Background(), ns, []netip.Addr{netip.MustParseAddr("fd00::2")}); err == nil {
		t.Error("Open of an IPv6 pod in a namespace without IPv6 succeeded")
	}
}

func rawOpt(t *testing.T, c syscall.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return v
}
