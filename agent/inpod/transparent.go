package inpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Transparent delivery: the agent hands an inbound connection to the
// application from a socket bound to the peer's address (IP_TRANSPARENT),
// so the application sees the real client, as with ztunnel. The
// application's replies go to that foreign address, so the pod's namespace
// needs three things, which SetupTransparent installs:
//
//   - net.ipv4.tcp_fwmark_accept=1: a connection accepted by the
//     application carries the mark of the SYN that opened it. The agent's
//     delivery socket sets DeliverMark, so every packet the application
//     sends on such a connection carries it too (nothing else in the pod
//     is affected: packets from outside the namespace arrive with mark 0).
//   - net.ipv4.fwmark_reflect=1 (and net.ipv6.): the kernel's own replies
//     (a RST from a closed port) carry it as well, so a refused delivery
//     fails at once instead of timing out.
//   - a policy rule "fwmark DeliverMark lookup DeliveryTable" and, in that
//     table, "local default dev lo": replies with the mark are delivered
//     locally, to the agent's socket, and never leave the pod.
//
// The rule and route are left in place when a pod leaves the mesh: they
// match only connections the agent delivered, which may still be draining.

// DeliveryTable is the routing table SetupTransparent fills in a pod's
// namespace, and DeliveryRulePriority the priority of the rule that selects
// it (before the main table, 32766).
const (
	DeliveryTable        = 0x4e4d // 20045
	DeliveryRulePriority = 32000
)

// HostProcSysNet is where the agent's DaemonSet mounts the host's
// /proc/sys/net (writable), for when the container's own /proc/sys is
// read-only. Like /proc/sys/net, it shows the network namespace of the
// thread that opens a file there.
const HostProcSysNet = "/host/proc/sys/net"

// probeSources are the foreign addresses of the delivery self-test
// (documentation ranges, RFC 5737 and RFC 3849): if the pod's routing does
// not bring the reply back, a SYN-ACK to them leaves the pod, and nothing
// answers it.
var probeSources = map[bool]netip.Addr{
	true:  netip.MustParseAddr("192.0.2.1"),
	false: netip.MustParseAddr("2001:db8::1"),
}

// SetupTransparent prepares the pod namespace at nsPath for transparent
// delivery with mark (see the comment above), for IPv4 and, when ipv6,
// IPv6. It is idempotent, so an agent that restarts applies it again.
func SetupTransparent(nsPath string, mark uint32, ipv6 bool) error {
	if mark == 0 {
		return errors.New("setting up transparent delivery: no mark given")
	}
	sysctls := []string{"net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect"}
	if ipv6 {
		sysctls = append(sysctls, "net/ipv6/fwmark_reflect")
	}
	// /proc/sys/net belongs to the network namespace of the thread that
	// opens it, so the writes happen inside the pod's namespace. A
	// container runtime mounts the container's /proc/sys read-only; the
	// agent's DaemonSet therefore also mounts the host's /proc/sys/net,
	// writable, at HostProcSysNet, which resolves the same way.
	if err := Do(nsPath, func() error {
		for _, s := range sysctls {
			err := os.WriteFile("/proc/sys/"+s, []byte("1"), 0)
			if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
				rest, _ := strings.CutPrefix(s, "net/")
				if err2 := os.WriteFile(HostProcSysNet+"/"+rest, []byte("1"), 0); err2 == nil {
					err = nil
				} else {
					err = errors.Join(err, err2)
				}
			}
			if err != nil {
				return fmt.Errorf("setting %s=1 (in a container, mount the host's /proc/sys/net writable at %s): %w", s, HostProcSysNet, err)
			}
		}
		return nil
	}); err != nil {
		return fmt.Errorf("setting up transparent delivery in %s: %w", nsName(nsPath), err)
	}

	ns, err := vnetns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("setting up transparent delivery: opening %s: %w", nsName(nsPath), err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("setting up transparent delivery: netlink in %s: %w", nsName(nsPath), err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("setting up transparent delivery: finding lo in %s: %w", nsName(nsPath), err)
	}
	families := []int{unix.AF_INET}
	if ipv6 {
		families = append(families, unix.AF_INET6)
	}
	for _, fam := range families {
		dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if fam == unix.AF_INET6 {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		r := &netlink.Route{
			Family: fam, Dst: dst, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST,
			Table: DeliveryTable, LinkIndex: lo.Attrs().Index,
		}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("setting up transparent delivery: route local %s dev lo table %d in %s: %w", dst, DeliveryTable, nsName(nsPath), err)
		}
		rule := netlink.NewRule()
		rule.Family = fam
		rule.Mark = mark
		mask := uint32(0xffffffff)
		rule.Mask = &mask
		rule.Table = DeliveryTable
		rule.Priority = DeliveryRulePriority
		if err := h.RuleAdd(rule); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("setting up transparent delivery: rule fwmark %#x lookup %d in %s: %w", mark, DeliveryTable, nsName(nsPath), err)
		}
	}
	return nil
}

// TransparentDialer dials the application inside a pod's network namespace
// from a socket bound to a foreign source address (the peer's), with SO_MARK
// Mark and IP_TRANSPARENT (IPV6_TRANSPARENT). The namespace must have been
// prepared with SetupTransparent for Mark, or the application's replies
// leave the pod and the connection never completes.
type TransparentDialer struct {
	// Netns is the pod's namespace path; empty means the caller's.
	Netns string
	// Mark is the delivery mark (not the capture bypass mark: that one
	// must not select the local-delivery route, since the agent's tunnels
	// and passthrough leave the pod with it).
	Mark uint32
}

// DialContext connects from src's address to dst. The kernel picks the
// source port, and never src's own port: the agent may hold a connection
// from exactly src to dst (inbound plaintext steered to it), whose 4-tuple
// the application's end of the new connection would otherwise repeat.
// src and dst must be of the same family.
func (d *TransparentDialer) DialContext(ctx context.Context, src, dst netip.AddrPort) (*net.TCPConn, error) {
	var err error
	for range 3 {
		var c *net.TCPConn
		c, err = d.dial(ctx, src, dst)
		if !errors.Is(err, errPortClash) {
			return c, err
		}
	}
	return nil, err
}

var errPortClash = errors.New("the kernel picked the peer's own source port")

func (d *TransparentDialer) dial(ctx context.Context, src, dst netip.AddrPort) (*net.TCPConn, error) {
	saddr, daddr := src.Addr().Unmap(), dst.Addr().Unmap()
	if !saddr.IsValid() || saddr.Is4() != daddr.Is4() {
		return nil, fmt.Errorf("dialing %s from %s transparently: source and destination families differ", dst, saddr)
	}
	network, level, opt := "tcp6", unix.SOL_IPV6, unix.IPV6_TRANSPARENT
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: saddr.As16()}
	if saddr.Is4() {
		network, level, opt = "tcp4", unix.SOL_IP, unix.IP_TRANSPARENT
		sa = &unix.SockaddrInet4{Addr: saddr.As4()}
	}
	nd := net.Dialer{
		// Called after socket(2) and before connect(2). It binds the
		// socket itself (LocalAddr stays nil) to see the port first.
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(d.Mark)); serr != nil {
					serr = fmt.Errorf("setting SO_MARK %#x: %w", d.Mark, serr)
					return
				}
				if serr = unix.SetsockoptInt(int(fd), level, opt, 1); serr != nil {
					serr = fmt.Errorf("setting IP_TRANSPARENT (needs CAP_NET_ADMIN): %w", serr)
					return
				}
				// Bound to lo, the route lookup skips the local table's
				// entry for the pod's address (on its eth0) and takes the
				// delivery table's "local default dev lo": the SYN then
				// arrives with lo as its ingress interface, which is how
				// the pod's sk_lookup program knows it comes from inside.
				if serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, "lo"); serr != nil {
					serr = fmt.Errorf("binding to device lo: %w", serr)
					return
				}
				if serr = unix.Bind(int(fd), sa); serr != nil {
					serr = fmt.Errorf("binding to %s: %w", saddr, serr)
					return
				}
				got, err := unix.Getsockname(int(fd))
				if err != nil {
					serr = fmt.Errorf("reading the bound port: %w", err)
					return
				}
				var port int
				switch a := got.(type) {
				case *unix.SockaddrInet4:
					port = a.Port
				case *unix.SockaddrInet6:
					port = a.Port
				}
				if src.Port() != 0 && port == int(src.Port()) {
					serr = errPortClash
				}
			}); err != nil {
				return err
			}
			return serr
		},
	}
	var c net.Conn
	dial := func() error {
		var err error
		c, err = nd.DialContext(ctx, network, dst.String())
		return err
	}
	var err error
	if d.Netns == "" {
		err = dial()
	} else {
		err = Do(d.Netns, dial)
	}
	if err != nil {
		return nil, fmt.Errorf("dialing %s from %s in %s: %w", dst, saddr, nsName(d.Netns), err)
	}
	return c.(*net.TCPConn), nil
}

// ProbeTransparent proves that transparent delivery works in the pod
// namespace at nsPath for the family of podIP: it listens on podIP (any
// port) there, dials it transparently from a documentation address with
// mark, and checks that the connection is accepted with that address as
// its peer. Capture (sk_lookup) must let the delivery through for this to
// pass, so the probe covers it too.
func ProbeTransparent(ctx context.Context, nsPath string, podIP netip.Addr, mark uint32) error {
	podIP = podIP.Unmap()
	src := probeSources[podIP.Is4()]
	network := "tcp4"
	if !podIP.Is4() {
		network = "tcp6"
	}
	ln, err := ListenTCP(ctx, nsPath, network, net.JoinHostPort(podIP.String(), "0"))
	if err != nil {
		return fmt.Errorf("probing transparent delivery: %w", err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ln.SetDeadline(time.Now().Add(2 * time.Second))
	dst := netip.MustParseAddrPort(ln.Addr().String())
	type accepted struct {
		c   net.Conn
		err error
	}
	acc := make(chan accepted, 1)
	go func() {
		c, err := ln.Accept()
		acc <- accepted{c, err}
	}()
	d := TransparentDialer{Netns: nsPath, Mark: mark}
	c, err := d.DialContext(ctx, netip.AddrPortFrom(src, 0), dst)
	if err != nil {
		ln.Close()
		<-acc
		return fmt.Errorf("probing transparent delivery from %s to %s: %w", src, dst, err)
	}
	defer c.Close()
	a := <-acc
	if a.err != nil {
		return fmt.Errorf("probing transparent delivery: the connection from %s did not reach a listener on %s: %w", src, dst, a.err)
	}
	defer a.c.Close()
	got, err := netip.ParseAddrPort(a.c.RemoteAddr().String())
	if err != nil || got.Addr().Unmap() != src {
		return fmt.Errorf("probing transparent delivery: the application side saw %s, want %s", a.c.RemoteAddr(), src)
	}
	if got.Port() != netip.MustParseAddrPort(c.LocalAddr().String()).Port() {
		return fmt.Errorf("probing transparent delivery: ports differ (%s vs %s)", a.c.RemoteAddr(), c.LocalAddr())
	}
	return nil
}
