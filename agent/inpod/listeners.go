package inpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
)

// The agent's in-pod ports (see docs/capture.md and ARCHITECTURE.md).
const (
	PortOutbound = 15001
	PortInbound  = 15006
	PortHBONE    = 15008
)

// Listeners are the agent's sockets inside one pod's network namespace.
type Listeners struct {
	// Netns is the namespace path the listeners were opened in.
	Netns string
	// Cookie identifies the namespace to the capture programs.
	Cookie uint64
	// Outbound accepts captured outbound connections: 127.0.0.1:15001,
	// and [::1]:15001 when the namespace has IPv6 loopback.
	Outbound []*net.TCPListener
	// Inbound receives inbound plaintext steered by sk_lookup:
	// 127.0.0.1:15006 and, with IPv6, [::1]:15006.
	Inbound []*net.TCPListener
	// HBONE listens on podIP:15008 for every pod IP.
	HBONE []*net.TCPListener
}

// Open opens the agent's listeners in the pod namespace at nsPath. IPv6
// listeners are opened when the namespace has ::1 (they are required when
// a pod IP is IPv6). Everything opened is closed again on error.
func Open(ctx context.Context, nsPath string, podIPs []netip.Addr) (_ *Listeners, err error) {
	if nsPath == "" {
		return nil, errors.New("opening in-pod listeners: empty network namespace path")
	}
	if len(podIPs) == 0 {
		return nil, fmt.Errorf("opening in-pod listeners in %s: the pod has no IP", nsPath)
	}
	want6 := false
	for _, ip := range podIPs {
		if !ip.IsValid() || ip.IsUnspecified() || ip.IsLoopback() || ip.IsMulticast() {
			return nil, fmt.Errorf("opening in-pod listeners in %s: %v is not a usable pod IP", nsPath, ip)
		}
		if ip.Unmap().Is6() {
			want6 = true
		}
	}
	l := &Listeners{Netns: nsPath}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	listen := func(network string, ip netip.Addr, port int) (*net.TCPListener, error) {
		return ListenTCP(ctx, nsPath, network, net.JoinHostPort(ip.String(), strconv.Itoa(port)))
	}

	ln, err := listen("tcp4", netip.AddrFrom4([4]byte{127, 0, 0, 1}), PortOutbound)
	if err != nil {
		return nil, err
	}
	l.Outbound = append(l.Outbound, ln)
	if l.Cookie, err = NetnsCookie(ln); err != nil {
		return nil, err
	}
	if ln, err = listen("tcp4", netip.AddrFrom4([4]byte{127, 0, 0, 1}), PortInbound); err != nil {
		return nil, err
	}
	l.Inbound = append(l.Inbound, ln)

	ln6, err := listen("tcp6", netip.IPv6Loopback(), PortOutbound)
	switch {
	case err == nil:
		l.Outbound = append(l.Outbound, ln6)
		if ln6, err = listen("tcp6", netip.IPv6Loopback(), PortInbound); err != nil {
			return nil, err
		}
		l.Inbound = append(l.Inbound, ln6)
	case want6:
		return nil, fmt.Errorf("pod has an IPv6 address but its namespace has no IPv6 loopback: %w", err)
	}

	for _, ip := range podIPs {
		ip = ip.Unmap()
		network := "tcp4"
		if ip.Is6() {
			network = "tcp6"
		}
		ln, err := listen(network, ip, PortHBONE)
		if err != nil {
			return nil, err
		}
		l.HBONE = append(l.HBONE, ln)
	}
	return l, nil
}

// Close closes every listener. Connections already accepted stay open.
func (l *Listeners) Close() error {
	var errs []error
	for _, group := range [][]*net.TCPListener{l.Outbound, l.Inbound, l.HBONE} {
		for _, ln := range group {
			if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
