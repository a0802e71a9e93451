package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

// loadUnpinned loads the capture objects with private (unpinned) maps.
func loadUnpinned(t *testing.T) *captureObjects {
	t.Helper()
	spec, err := loadCapture()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	if err := spec.Variables[captureVarAgentMark].Set(DefaultMark); err != nil {
		t.Fatal(err)
	}
	var objs captureObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	return &objs
}

// skLookupCtx mirrors struct bpf_sk_lookup for BPF_PROG_RUN.
type skLookupCtx struct {
	Cookie         uint64
	Family         uint32
	Protocol       uint32
	RemoteIP4      [4]byte
	RemoteIP6      [16]byte
	RemotePort     uint16 // network byte order
	_              uint16
	LocalIP4       [4]byte
	LocalIP6       [16]byte
	LocalPort      uint32 // host byte order
	IngressIfindex uint32
	_              uint32
}

func lookupCtx(proto uint32, remote, local netip.AddrPort) skLookupCtx {
	c := skLookupCtx{Protocol: proto, LocalPort: uint32(local.Port())}
	rp := remote.Port()
	c.RemotePort = rp>>8 | rp<<8
	if local.Addr().Is4() {
		c.Family = unix.AF_INET
		c.RemoteIP4, c.LocalIP4 = remote.Addr().As4(), local.Addr().As4()
	} else {
		c.Family = unix.AF_INET6
		c.RemoteIP6, c.LocalIP6 = remote.Addr().As16(), local.Addr().As16()
	}
	return c
}

func socketCookie(t *testing.T, c *net.TCPListener) uint64 {
	t.Helper()
	fd, err := socketFD(c)
	if err != nil {
		t.Fatal(err)
	}
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestPrivSkLookupDecisions runs the inbound steering program through
// BPF_PROG_RUN (Linux 5.14+ supports test runs of sk_lookup).
func TestPrivSkLookupDecisions(t *testing.T) {
	privtest.Root(t)
	objs := loadUnpinned(t)

	ctx := context.Background()
	ln4, err := inpod.ListenTCP(ctx, "", "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln4.Close()
	ln6, err := inpod.ListenTCP(ctx, "", "tcp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln6.Close()
	put := func(slot uint32, ln *net.TCPListener) {
		fd, err := socketFD(ln)
		if err != nil {
			t.Fatal(err)
		}
		if err := objs.InboundSocks.Put(slot, uint64(fd)); err != nil {
			t.Fatalf("sockmap update: %v", err)
		}
	}
	put(3, ln4)
	put(4, ln6)
	pod4, pod6 := netip.MustParseAddr("10.99.0.5"), netip.MustParseAddr("fd00:99::5")
	gone4, gone6 := netip.MustParseAddr("10.99.0.6"), netip.MustParseAddr("fd00:99::6")
	for ip, slot := range map[netip.Addr]uint32{pod4: 3, pod6: 4, gone4: 7, gone6: 8 /* empty slots: agent gone */} {
		fam, a := keyFromIP(ip)
		if err := objs.Inbound.Put(captureIpKey{Family: fam, Addr: a}, captureInboundVal{Slot: slot, Netns: 1}); err != nil {
			t.Fatal(err)
		}
	}
	// Port 9090 of the pod (netns cookie 1) is excluded from inbound capture.
	if err := objs.InboundExcluded.Put(capturePortKey{Netns: 1, Port: 9090}, uint8(1)); err != nil {
		t.Fatal(err)
	}
	// The node's addresses, and port 8081 probed by kubelet: open to the
	// node while the listener is absent.
	node4, node6 := netip.MustParseAddr("10.99.0.1"), netip.MustParseAddr("fd00:99::1")
	for _, ip := range []netip.Addr{node4, node6} {
		fam, a := keyFromIP(ip)
		if err := objs.NodeAddrs.Put(captureIpKey{Family: fam, Addr: a}, uint8(1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := objs.NodeProbePorts.Put(capturePortKey{Netns: 1, Port: 8081}, uint8(1)); err != nil {
		t.Fatal(err)
	}
	c4, c6 := socketCookie(t, ln4), socketCookie(t, ln6)
	peer4, peer6 := netip.MustParseAddr("10.99.0.9"), netip.MustParseAddr("fd00:99::9")
	ap := netip.AddrPortFrom

	tests := []struct {
		name       string
		proto      uint32
		remote     netip.AddrPort
		local      netip.AddrPort
		wantRet    uint32 // SK_PASS=1, SK_DROP=0
		wantCookie uint64 // 0: normal lookup
	}{
		{"v4 app port steered to 15006", unix.IPPROTO_TCP, ap(peer4, 40000), ap(pod4, 8080), 1, c4},
		{"v4 low port steered", unix.IPPROTO_TCP, ap(peer4, 40000), ap(pod4, 22), 1, c4},
		{"v4 HBONE port untouched", unix.IPPROTO_TCP, ap(peer4, 40000), ap(pod4, 15008), 1, 0},
		{"v4 from the pod itself untouched", unix.IPPROTO_TCP, ap(pod4, 40000), ap(pod4, 8080), 1, 0},
		{"v4 UDP untouched", unix.IPPROTO_UDP, ap(peer4, 40000), ap(pod4, 53), 1, 0},
		{"v4 address not the pod's dropped", unix.IPPROTO_TCP, ap(peer4, 40000), ap(netip.MustParseAddr("10.99.0.77"), 8080), 0, 0},
		{"v4 loopback untouched", unix.IPPROTO_TCP, ap(netip.MustParseAddr("127.0.0.5"), 40000), ap(netip.MustParseAddr("127.0.0.1"), 8080), 1, 0},
		{"v4 excluded port untouched", unix.IPPROTO_TCP, ap(peer4, 40000), ap(pod4, 9090), 1, 0},
		{"v4 excluded port, UDP untouched", unix.IPPROTO_UDP, ap(peer4, 40000), ap(pod4, 9090), 1, 0},
		{"v4 listener gone: refused", unix.IPPROTO_TCP, ap(peer4, 40000), ap(gone4, 8080), 0, 0},
		{"v4 listener gone, another pod to a probe port: refused", unix.IPPROTO_TCP, ap(peer4, 40000), ap(gone4, 8081), 0, 0},
		{"v4 listener gone, node to a probe port: the app", unix.IPPROTO_TCP, ap(node4, 40000), ap(gone4, 8081), 1, 0},
		{"v4 listener gone, node to another port: refused", unix.IPPROTO_TCP, ap(node4, 40000), ap(gone4, 8080), 0, 0},
		{"v4 listener there, node to a probe port: steered", unix.IPPROTO_TCP, ap(node4, 40000), ap(pod4, 8081), 1, c4},
		{"v4 node to an unregistered address: dropped", unix.IPPROTO_TCP, ap(node4, 40000), ap(netip.MustParseAddr("10.99.0.77"), 8081), 0, 0},
		{"v6 listener gone, node to a probe port: the app", unix.IPPROTO_TCP, ap(node6, 40000), ap(gone6, 8081), 1, 0},
		{"v6 listener gone, node to another port: refused", unix.IPPROTO_TCP, ap(node6, 40000), ap(gone6, 8080), 0, 0},
		{"v6 listener gone, another pod to a probe port: refused", unix.IPPROTO_TCP, ap(peer6, 40000), ap(gone6, 8081), 0, 0},
		{"v6 listener gone, v4-mapped node address: refused", unix.IPPROTO_TCP, ap(netip.MustParseAddr("::ffff:10.99.0.1"), 40000), ap(gone6, 8081), 0, 0},
		{"v6 listener there, node to a probe port: steered", unix.IPPROTO_TCP, ap(node6, 40000), ap(pod6, 8081), 1, c6},
		{"v6 node to a link-local address: dropped", unix.IPPROTO_TCP, ap(node6, 40000), ap(netip.MustParseAddr("fe80::5"), 8081), 0, 0},
		{"v6 app port steered to 15006", unix.IPPROTO_TCP, ap(peer6, 40000), ap(pod6, 8080), 1, c6},
		{"v6 HBONE port untouched", unix.IPPROTO_TCP, ap(peer6, 40000), ap(pod6, 15008), 1, 0},
		{"v6 from the pod itself untouched", unix.IPPROTO_TCP, ap(pod6, 40000), ap(pod6, 8080), 1, 0},
		{"v6 UDP untouched", unix.IPPROTO_UDP, ap(peer6, 40000), ap(pod6, 8080), 1, 0},
		{"v6 excluded port untouched", unix.IPPROTO_TCP, ap(peer6, 40000), ap(pod6, 9090), 1, 0},
		{"v6 link-local dropped", unix.IPPROTO_TCP, ap(netip.MustParseAddr("fe80::1"), 40000), ap(netip.MustParseAddr("fe80::5"), 8080), 0, 0},
		{"v6 link-local HBONE port untouched", unix.IPPROTO_TCP, ap(netip.MustParseAddr("fe80::1"), 40000), ap(netip.MustParseAddr("fe80::5"), 15008), 1, 0},
		{"v6 unregistered global dropped", unix.IPPROTO_TCP, ap(peer6, 40000), ap(netip.MustParseAddr("fd00:99::77"), 8080), 0, 0},
		{"v6 link-local to itself untouched", unix.IPPROTO_TCP, ap(netip.MustParseAddr("fe80::5"), 40000), ap(netip.MustParseAddr("fe80::5"), 8080), 1, 0},
		{"v6 loopback untouched", unix.IPPROTO_TCP, ap(netip.IPv6Loopback(), 40000), ap(netip.IPv6Loopback(), 8080), 1, 0},
		{"v6 mapped loopback untouched", unix.IPPROTO_TCP, ap(netip.MustParseAddr("::ffff:127.0.0.9"), 40000), ap(netip.MustParseAddr("::ffff:127.0.0.1"), 8080), 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := lookupCtx(tt.proto, tt.remote, tt.local)
			var out skLookupCtx
			ret, err := objs.NmSklookup.Run(&ebpf.RunOptions{Context: in, ContextOut: &out})
			if errors.Is(err, ebpf.ErrNotSupported) {
				t.Skipf("kernel lacks BPF_PROG_RUN for sk_lookup (Linux 5.14+): %v", err)
			}
			if err != nil {
				t.Fatal(err)
			}
			if ret != tt.wantRet || out.Cookie != tt.wantCookie {
				t.Errorf("verdict %d, selected socket cookie %d; want verdict %d, cookie %d (15006 v4=%d v6=%d)",
					ret, out.Cookie, tt.wantRet, tt.wantCookie, c4, c6)
			}
		})
	}
}
