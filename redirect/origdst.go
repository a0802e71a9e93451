package redirect

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/inpod"
)

// ErrNoOriginalDst means a connection accepted on 15001 has no recorded
// original destination (it was not captured, or the record was evicted);
// the agent must refuse it.
var ErrNoOriginalDst = errors.New("no original destination recorded")

// OriginalDst returns the destination the application connected to before
// capture redirected it to the agent's 15001 listener. conn is a connection
// accepted from an enrolled pod's outbound listener. The record is deleted
// by the lookup, so each connection can be resolved once.
func (c *Capture) OriginalDst(conn *net.TCPConn) (netip.AddrPort, error) {
	cookie, err := inpod.NetnsCookie(conn)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("finding original destination: %w", err)
	}
	peer, err := netip.ParseAddrPort(conn.RemoteAddr().String())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("finding original destination: peer address: %w", err)
	}
	return c.originalDst(cookie, peer)
}

func (c *Capture) originalDst(cookie uint64, peer netip.AddrPort) (netip.AddrPort, error) {
	// The kernel records the app's socket as it sees it: a v4-mapped peer
	// of a dual-stack listener is an IPv4 socket on the app side.
	fam, a := keyFromIP(peer.Addr())
	k := captureFlowKey{Netns: cookie, Family: fam, Port: uint32(peer.Port()), Addr: a}
	var v captureOrigDst
	if err := c.objs.Origdst.LookupAndDelete(k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return netip.AddrPort{}, fmt.Errorf("connection from %v (netns cookie %d): %w", peer, cookie, ErrNoOriginalDst)
		}
		return netip.AddrPort{}, fmt.Errorf("finding original destination of %v: %w", peer, err)
	}
	ip := ipFromKey(v.Family, v.Addr)
	if v.Family == unix.AF_INET6 {
		ip = ip.Unmap()
	}
	return netip.AddrPortFrom(ip, uint16(v.Port)), nil
}

func socketFD(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("getting raw socket: %w", err)
	}
	fd := -1
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return 0, fmt.Errorf("getting socket fd: %w", err)
	}
	return fd, nil
}

// AcceptOutbound accepts the next captured connection on ln (one of
// ep.Listeners.Outbound) and returns it with its original destination.
// Connections without a recorded destination are closed (fail closed) and
// self-check probes are answered; neither is returned.
func (ep *EnrolledPod) AcceptOutbound(ln *net.TCPListener) (*net.TCPConn, netip.AddrPort, error) {
	for {
		conn, err := ln.AcceptTCP()
		if err != nil {
			return nil, netip.AddrPort{}, err
		}
		dst, err := ep.c.OriginalDst(conn)
		if err != nil {
			ep.c.refuseNoOrigDst(ep, conn, err)
			continue
		}
		if dst.Port() == ProbePort && ep.ownIP(dst.Addr()) {
			ep.probes.answer(conn)
			continue
		}
		return conn, dst, nil
	}
}

// refuseNoOrigDst resets a connection that reached an outbound listener
// without being captured: an application inside the pod can dial
// 127.0.0.1:15001 or [::1]:15001 directly, as often as it likes. Each is
// counted (nodemesh_capture_events_total{event="outbound_no_origdst"});
// a log line is written at most once a minute, so a pod cannot flood the
// agent's log.
func (c *Capture) refuseNoOrigDst(ep *EnrolledPod, conn *net.TCPConn, err error) {
	c.noOrigDst.Add(1)
	_ = conn.SetLinger(0) // a reset: the application must not take it for an empty answer
	conn.Close()
	now := time.Now().UnixNano()
	last := c.noOrigDstLogged.Load()
	if (last == 0 || now-last >= int64(time.Minute)) && c.noOrigDstLogged.CompareAndSwap(last, now) {
		c.log.Warn("refusing connections to the outbound listener without an original destination (an application dialling the agent's in-pod port directly?); logged at most once a minute",
			"pod", ep.Name, "src", conn.RemoteAddr(), "err", err, "not_logged_since_last", c.noOrigDstHeld.Swap(0))
		return
	}
	c.noOrigDstHeld.Add(1)
}

func (ep *EnrolledPod) ownIP(ip netip.Addr) bool {
	for _, a := range ep.IPs {
		if a.Unmap() == ip.Unmap() {
			return true
		}
	}
	return false
}

// probes answers capture self-check probes that arrive on 15001.
type probes struct {
	c  *Capture
	ep *EnrolledPod
	wg sync.WaitGroup
}

func (p *probes) init(c *Capture, ep *EnrolledPod) { p.c, p.ep = c, ep }
func (p *probes) wait()                            { p.wg.Wait() }

const (
	probeHello, probeReply = "NODEMESH-PROBE ", "NODEMESH-CAPTURED "
	probeMaxLine           = 128
)

func (p *probes) answer(conn *net.TCPConn) {
	p.wg.Go(func() {
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		// Anything in the pod can connect here; read a bounded line only.
		line, err := bufio.NewReader(io.LimitReader(conn, probeMaxLine)).ReadString('\n')
		if err != nil || len(line) <= len(probeHello) || line[:len(probeHello)] != probeHello {
			return
		}
		conn.Write([]byte(probeReply + line[len(probeHello):]))
	})
}

// SelfCheck proves that the pod's outbound capture is in effect: from
// inside the pod's namespace, with an ordinary (unmarked) socket as the app
// would use, it connects to each pod IP at ProbePort and expects the
// agent's 15001 accept loop (AcceptOutbound) to answer with a nonce. If
// capture is not in effect, the probe stays inside the pod (it targets the
// pod's own address) and fails. Callers report a pod as captured only after
// SelfCheck returns nil.
func (ep *EnrolledPod) SelfCheck(ctx context.Context) (err error) {
	defer func() { ep.record(err) }()
	for _, ip := range ep.IPs {
		if err := ep.probe(ctx, ip); err != nil {
			return fmt.Errorf("capture self-check of pod %s: %w", ep.Name, err)
		}
	}
	return nil
}

// checkState is the outcome of the last SelfCheck.
type checkState struct {
	mu       sync.Mutex
	verified bool
	at       time.Time
	err      error
}

func (s *checkState) record(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.verified, s.at, s.err = err == nil, time.Now(), err
}

// Verified reports whether the last SelfCheck proved capture, when it ran,
// and its error. A pod never checked is not verified.
func (s *checkState) Verified() (ok bool, at time.Time, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.verified, s.at, s.err
}

func (ep *EnrolledPod) probe(ctx context.Context, ip netip.Addr) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	target := net.JoinHostPort(ip.Unmap().String(), strconv.Itoa(ProbePort))
	d := inpod.Dialer{Netns: ep.Netns}
	conn, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return fmt.Errorf("probe to %s was not captured (is the pod enrolled and the agent listening on 15001?): %w", target, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	var nb [16]byte
	rand.Read(nb[:])
	nonce := hex.EncodeToString(nb[:])
	if _, err := conn.Write([]byte(probeHello + nonce + "\n")); err != nil {
		return fmt.Errorf("probe to %s: %w", target, err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("probe to %s got no answer from the agent (is AcceptOutbound serving 15001?): %w", target, err)
	}
	if line != probeReply+nonce+"\n" {
		return fmt.Errorf("probe to %s was answered by something other than the agent (%q): capture is NOT in effect", target, line)
	}
	return nil
}
