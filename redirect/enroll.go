package redirect

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/inpod"
)

// Pod describes a pod to enroll.
type Pod struct {
	// Name is for messages, e.g. "default/web-0".
	Name string
	// Netns is the path of the pod's network namespace.
	Netns string
	// Cgroup is the pod's cgroup v2 directory. When set, Enroll checks that
	// it lies under the capture root, because a pod outside it would not
	// be captured at all.
	Cgroup string
	// IPs are the pod's addresses (IPv4 and/or IPv6).
	IPs []netip.Addr
	// ExcludeOutboundPorts are destination ports the pod reaches without
	// capture (annotation nodemesh.io/exclude-outbound-ports).
	ExcludeOutboundPorts []uint16
	// ExcludeInboundPorts are ports of the pod that peers reach without
	// capture, in plaintext and without the agent's policy (annotation
	// nodemesh.io/exclude-inbound-ports). Source agents send plaintext to
	// them too, so the destination must let it through.
	ExcludeInboundPorts []uint16
	// NodeProbePorts are the pod's ports that connections from the node's
	// own addresses (SetNodeAddrs) reach directly while the agent's
	// inbound listener is absent (the agent restarting): kubelet's probe
	// ports, which the policy admits from the node in plaintext even
	// under STRICT. While the agent listens they go through it like every
	// other connection. Agent ports and 0 are ignored.
	NodeProbePorts []uint16
}

// EnrolledPod is a pod whose TCP traffic is captured, with the agent's
// listeners inside its network namespace.
type EnrolledPod struct {
	Pod
	// Cookie is the pod's network namespace cookie, the enrollment key.
	Cookie uint64
	// Listeners are the agent's sockets in the pod (15001, 15006, 15008).
	Listeners *inpod.Listeners

	c *Capture
	probes
	checkState
	deliveryOnce sync.Once
	delivery     atomic.Pointer[deliveryState] // nil until Enroll set it up
}

// deliveryState says whether inbound connections reach the pod's
// applications from the peer's address, and why not.
type deliveryState struct {
	ok  bool
	why string
}

type podState struct {
	cookie    uint64
	link      link.Link // sk_lookup link in the pod's netns, pinned
	ips       []netip.Addr
	slots     []uint32
	ep        *EnrolledPod // nil for a pod adopted but not re-enrolled yet
	ports     []uint16     // excluded outbound
	inPorts   []uint16     // excluded inbound
	nodePorts []uint16     // probe ports open to the node without a listener
}

func (p *podState) closeListeners() {
	if p.ep != nil {
		p.ep.Listeners.Close()
		p.ep.probes.wait()
	}
}

// AdoptedPod is a pod left enrolled by a previous agent instance.
type AdoptedPod struct {
	Cookie uint64
	IPs    []netip.Addr
}

// AdoptedPods lists the pods found enrolled at Load that have not been
// enrolled again since. They stay captured and fail closed; the agent
// re-enrolls the ones that still exist and unenrolls the rest with
// UnenrollCookie.
func (c *Capture) AdoptedPods() []AdoptedPod {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []AdoptedPod
	for cookie, p := range c.pods {
		if p.ep == nil {
			out = append(out, AdoptedPod{Cookie: cookie, IPs: slices.Clone(p.ips)})
		}
	}
	return out
}

// readoptPods rebuilds pod state from the pinned maps and sk_lookup links
// and points those links at the newly loaded program.
func (c *Capture) readoptPods() error {
	var k captureIpKey
	var v captureInboundVal
	it := c.objs.Inbound.Iterate()
	for it.Next(&k, &v) {
		p := c.pods[v.Netns]
		if p == nil {
			p = &podState{cookie: v.Netns}
			c.pods[v.Netns] = p
		}
		p.ips = append(p.ips, ipFromKey(k.Family, k.Addr))
		p.slots = append(p.slots, v.Slot)
		c.slots[v.Slot] = true
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("adopting enrolled pods: reading inbound map: %w", err)
	}
	var cookie uint64
	var cfg capturePodCfg
	eit := c.objs.Enrolled.Iterate()
	for eit.Next(&cookie, &cfg) {
		if c.pods[cookie] == nil {
			c.pods[cookie] = &podState{cookie: cookie}
		}
	}
	if err := eit.Err(); err != nil {
		return fmt.Errorf("adopting enrolled pods: reading enrollment map: %w", err)
	}
	ents, err := os.ReadDir(c.podsDir)
	if err != nil {
		return fmt.Errorf("adopting enrolled pods: %w", err)
	}
	for _, e := range ents {
		cookie, err := strconv.ParseUint(e.Name(), 10, 64)
		pin := filepath.Join(c.podsDir, e.Name())
		if err != nil {
			return fmt.Errorf("adopting enrolled pods: unexpected pin %s", pin)
		}
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return fmt.Errorf("adopting enrolled pods: opening %s: %w", pin, err)
		}
		if err := l.Update(c.objs.NmSklookup); err != nil {
			// A link whose namespace is gone cannot be updated; the pod is.
			c.log.Warn("dropping sk_lookup link of a vanished pod", "cookie", cookie, "err", err)
			l.Unpin()
			l.Close()
			continue
		}
		p := c.pods[cookie]
		if p == nil {
			p = &podState{cookie: cookie}
			c.pods[cookie] = p
		}
		p.link = l
	}
	return nil
}

func ipFromKey(family uint32, a [4]uint32) netip.Addr {
	var b [16]byte
	for i, w := range a {
		// Addresses are stored in network byte order: the bytes as they are.
		b[i*4], b[i*4+1], b[i*4+2], b[i*4+3] = byte(w), byte(w>>8), byte(w>>16), byte(w>>24)
	}
	if family == unix.AF_INET {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

func keyFromIP(ip netip.Addr) (family uint32, a [4]uint32) {
	ip = ip.Unmap()
	var b [16]byte
	if ip.Is4() {
		family = unix.AF_INET
		v4 := ip.As4()
		copy(b[:], v4[:])
	} else {
		family = unix.AF_INET6
		b = ip.As16()
	}
	for i := range a {
		a[i] = uint32(b[i*4]) | uint32(b[i*4+1])<<8 | uint32(b[i*4+2])<<16 | uint32(b[i*4+3])<<24
	}
	return family, a
}

func (c *Capture) allocSlot() (uint32, error) {
	for range c.maxSlots {
		s := c.nextSlot
		c.nextSlot = (c.nextSlot + 1) % c.maxSlots
		if !c.slots[s] {
			c.slots[s] = true
			return s, nil
		}
	}
	return 0, fmt.Errorf("no free inbound listener slot (%d in use)", c.maxSlots)
}

// Enroll captures the pod's TCP traffic: it opens the agent's listeners in
// the pod's namespace, steers inbound connections to 15006, and then adds
// the pod to the enrollment map, so outbound connects are redirected only
// once a listener is there. Enrolling a pod that is already enrolled and
// served updates its excluded ports and returns the same *EnrolledPod (its
// listeners stay). Enrolling a pod adopted from a previous agent opens new
// listeners and takes over its programs without a moment in which the pod
// is uncaptured.
func (c *Capture) Enroll(ctx context.Context, pod Pod) (*EnrolledPod, error) {
	ep, err := c.enroll(ctx, pod)
	if err != nil {
		return nil, err
	}
	ep.deliveryOnce.Do(func() { ep.setupDelivery(ctx) })
	return ep, nil
}

// setupDelivery prepares and proves transparent delivery in the pod's
// namespace (agent/inpod.SetupTransparent, ProbeTransparent), once, after
// capture is in place so that the probe crosses the pod's sk_lookup
// program as real deliveries do. If that fails the pod's inbound
// connections are delivered from its own address: logged once here,
// and visible as nodemesh_capture_pod_source_preserved 0.
func (ep *EnrolledPod) setupDelivery(ctx context.Context) {
	c := ep.c
	if !c.transparent {
		ep.delivery.Store(&deliveryState{why: c.transparentWhy})
		return
	}
	err := func() error {
		ipv6 := false
		for _, ln := range ep.Listeners.Inbound {
			if a, ok := ln.Addr().(*net.TCPAddr); ok && a.IP.To4() == nil {
				ipv6 = true
			}
		}
		if err := inpod.SetupTransparent(ep.Netns, c.cfg.DeliverMark, ipv6); err != nil {
			return err
		}
		for _, ip := range ep.IPs {
			if err := inpod.ProbeTransparent(ctx, ep.Netns, ip, c.cfg.DeliverMark); err != nil {
				return err
			}
		}
		return nil
	}()
	if err != nil {
		ep.delivery.Store(&deliveryState{why: err.Error()})
		c.log.Warn("transparent inbound delivery failed for the pod; its applications will see the pod's own IP as the source of inbound connections",
			"pod", ep.Name, "err", err)
		return
	}
	ep.delivery.Store(&deliveryState{ok: true, why: "transparent"})
}

// SourcePreserved reports whether the pod's inbound connections reach its
// applications from the peer's address, and why not.
func (ep *EnrolledPod) SourcePreserved() (bool, string) {
	d := ep.delivery.Load()
	if d == nil {
		return false, "not set up yet"
	}
	return d.ok, d.why
}

// DialInbound opens the agent's connection to the pod's application at dst
// for an inbound connection from src: from src's address (transparent)
// when the pod's delivery is preserved and src is a usable address of
// dst's family; otherwise with plain, which dials from the pod's own
// address. Both cases are counted (nodemesh_capture_deliveries_total).
func (ep *EnrolledPod) DialInbound(ctx context.Context, src, dst netip.AddrPort, plain func() (net.Conn, error)) (net.Conn, error) {
	s := src.Addr().Unmap()
	if ok, _ := ep.SourcePreserved(); !ok || !s.IsValid() || s.IsUnspecified() || s.IsLoopback() || s.IsMulticast() || s.Is4() != dst.Addr().Unmap().Is4() {
		ep.c.deliveries[1].Add(1)
		return plain()
	}
	ep.c.deliveries[0].Add(1)
	d := inpod.TransparentDialer{Netns: ep.Netns, Mark: ep.c.cfg.DeliverMark}
	c, err := d.DialContext(ctx, netip.AddrPortFrom(s, src.Port()), dst)
	if err != nil {
		return nil, err // not a typed nil *net.TCPConn
	}
	return c, nil
}

func (c *Capture) enroll(ctx context.Context, pod Pod) (_ *EnrolledPod, err error) {
	if pod.Name == "" {
		pod.Name = pod.Netns
	}
	if pod.Cgroup != "" && !within(pod.Cgroup, c.cfg.CgroupRoot) {
		return nil, fmt.Errorf("enrolling pod %s: its cgroup %s is outside the capture root %s, so its connects would not be captured; run the agent with the node's pod cgroup as root", pod.Name, pod.Cgroup, c.cfg.CgroupRoot)
	}
	ports := slices.Clone(pod.ExcludeOutboundPorts)
	ports = slices.DeleteFunc(ports, func(p uint16) bool { return p == ProbePort || p == 0 })
	if len(ports) != len(pod.ExcludeOutboundPorts) {
		return nil, fmt.Errorf("enrolling pod %s: excluded outbound ports %v include 0 or the self-check probe port %d", pod.Name, pod.ExcludeOutboundPorts, ProbePort)
	}
	inPorts := slices.Clone(pod.ExcludeInboundPorts)
	inPorts = slices.DeleteFunc(inPorts, func(p uint16) bool { return p == ProbePort || p == 0 || agentPort(p) })
	if len(inPorts) != len(pod.ExcludeInboundPorts) {
		return nil, fmt.Errorf("enrolling pod %s: excluded inbound ports %v include 0, an agent port (15000, 15001, 15006, 15008, 15020, 15021) or the self-check probe port %d", pod.Name, pod.ExcludeInboundPorts, ProbePort)
	}

	nodePorts := nodeProbePorts(pod.NodeProbePorts)

	cookie, err := inpod.Cookie(pod.Netns)
	if err != nil {
		return nil, fmt.Errorf("enrolling pod %s: %w", pod.Name, err)
	}
	c.mu.Lock()
	if p := c.pods[cookie]; p != nil && p.ep != nil {
		defer c.mu.Unlock()
		return c.updateLocked(p, pod, ports, inPorts, nodePorts)
	}
	c.mu.Unlock()

	ls, err := inpod.Open(ctx, pod.Netns, pod.IPs)
	if err != nil {
		return nil, fmt.Errorf("enrolling pod %s: %w", pod.Name, err)
	}
	pod.NodeProbePorts = nodePorts
	ep := &EnrolledPod{Pod: pod, Cookie: ls.Cookie, Listeners: ls, c: c}
	ep.probes.init(c, ep)

	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		ls.Close()
		return nil, ErrClosed
	}
	old := c.pods[ls.Cookie]
	st := &podState{cookie: ls.Cookie, ep: ep, ports: ports, inPorts: inPorts, nodePorts: nodePorts}
	prevInbound := map[captureIpKey]*captureInboundVal{} // to restore on error
	defer func() {
		if err != nil {
			for k, v := range prevInbound {
				if v != nil {
					c.objs.Inbound.Put(k, *v)
				} else {
					c.objs.Inbound.Delete(k)
				}
			}
			// Undo what this call added; the previous state (if any) stays.
			for _, s := range st.slots {
				if old == nil || !slices.Contains(old.slots, s) {
					c.objs.InboundSocks.Delete(s)
					delete(c.slots, s)
				}
			}
			if st.link != nil && (old == nil || st.link != old.link) {
				st.link.Unpin()
				st.link.Close()
			}
			ls.Close()
		}
	}()

	// Inbound: a 15006 listener per family in a sockmap slot, pod IPs -> slot.
	byFamily := map[bool]uint32{}
	for _, ln := range ls.Inbound {
		s, err := c.allocSlot()
		if err != nil {
			return nil, fmt.Errorf("enrolling pod %s: %w", pod.Name, err)
		}
		st.slots = append(st.slots, s)
		fd, err := socketFD(ln)
		if err != nil {
			return nil, fmt.Errorf("enrolling pod %s: %w", pod.Name, err)
		}
		if err := c.objs.InboundSocks.Update(s, uint64(fd), ebpf.UpdateAny); err != nil {
			return nil, fmt.Errorf("enrolling pod %s: adding the 15006 listener to the sockmap: %w", pod.Name, err)
		}
		ap, _ := netip.ParseAddrPort(ln.Addr().String())
		byFamily[ap.Addr().Unmap().Is4()] = s
	}
	for _, ip := range pod.IPs {
		s, ok := byFamily[ip.Unmap().Is4()]
		if !ok {
			return nil, fmt.Errorf("enrolling pod %s: no inbound listener for %v", pod.Name, ip)
		}
		fam, a := keyFromIP(ip)
		k := captureIpKey{Family: fam, Addr: a}
		if _, seen := prevInbound[k]; !seen {
			var v captureInboundVal
			if err := c.objs.Inbound.Lookup(k, &v); err == nil {
				prevInbound[k] = &v
			} else {
				prevInbound[k] = nil
			}
		}
		if err := c.objs.Inbound.Update(k, captureInboundVal{Slot: s, Netns: ls.Cookie}, ebpf.UpdateAny); err != nil {
			return nil, fmt.Errorf("enrolling pod %s: steering inbound for %v: %w", pod.Name, ip, err)
		}
		st.ips = append(st.ips, ip.Unmap())
	}
	// The sk_lookup program in the pod's namespace (kept from before, if any).
	if old != nil && old.link != nil {
		st.link = old.link
	} else {
		nsf, err := os.Open(pod.Netns)
		if err != nil {
			return nil, fmt.Errorf("enrolling pod %s: %w", pod.Name, err)
		}
		l, err := link.AttachNetNs(int(nsf.Fd()), c.objs.NmSklookup)
		nsf.Close()
		if err != nil {
			return nil, fmt.Errorf("enrolling pod %s: attaching sk_lookup (needs Linux 5.9+): %w", pod.Name, err)
		}
		st.link = l
		if err := l.Pin(filepath.Join(c.podsDir, cookieName(ls.Cookie))); err != nil {
			return nil, fmt.Errorf("enrolling pod %s: pinning sk_lookup link: %w", pod.Name, err)
		}
	}
	// Excluded and probe ports: add the new sets, then drop the rest.
	if err := c.setExcluded(ls.Cookie, ports, inPorts, nodePorts); err != nil {
		return nil, fmt.Errorf("enrolling pod %s: %w", pod.Name, err)
	}
	// Outbound capture on, now that 15001 is listening.
	if err := c.objs.Enrolled.Update(ls.Cookie, capturePodCfg{Flags: 1}, ebpf.UpdateAny); err != nil {
		return nil, fmt.Errorf("enrolling pod %s: updating the enrollment map: %w", pod.Name, err)
	}

	if old != nil {
		// Forget what the new state does not reuse.
		for _, s := range old.slots {
			c.objs.InboundSocks.Delete(s)
			delete(c.slots, s)
		}
		for _, ip := range old.ips {
			if !slices.Contains(st.ips, ip) {
				fam, a := keyFromIP(ip)
				c.objs.Inbound.Delete(captureIpKey{Family: fam, Addr: a})
			}
		}
		old.closeListeners()
	}
	c.pods[ls.Cookie] = st
	c.log.Info("pod enrolled", "pod", pod.Name, "netns_cookie", ls.Cookie, "ips", pod.IPs, "readopted", old != nil)
	return ep, nil
}

// updateLocked applies new settings to a pod that is enrolled and served:
// its listeners stay as they are.
func (c *Capture) updateLocked(p *podState, pod Pod, ports, inPorts, nodePorts []uint16) (*EnrolledPod, error) {
	if c.closed {
		return nil, ErrClosed
	}
	ips := make([]netip.Addr, len(pod.IPs))
	for i, ip := range pod.IPs {
		ips[i] = ip.Unmap()
	}
	if !slices.Equal(ips, p.ips) {
		return nil, fmt.Errorf("updating pod %s: its IPs changed from %v to %v; unenroll it and enroll it again", pod.Name, p.ips, ips)
	}
	if err := c.setExcluded(p.cookie, ports, inPorts, nodePorts); err != nil {
		return nil, fmt.Errorf("updating pod %s: %w", pod.Name, err)
	}
	p.ports, p.inPorts, p.nodePorts = ports, inPorts, nodePorts
	p.ep.ExcludeOutboundPorts = slices.Clone(ports)
	p.ep.ExcludeInboundPorts = slices.Clone(inPorts)
	p.ep.NodeProbePorts = slices.Clone(nodePorts)
	c.log.Info("pod enrollment updated", "pod", pod.Name, "netns_cookie", p.cookie, "excluded_ports", ports,
		"excluded_inbound_ports", inPorts, "node_probe_ports", nodePorts)
	return p.ep, nil
}

// nodeProbePorts returns ports without 0, the agent's ports and the
// self-check port, none of which may ever reach an application around the
// agent.
func nodeProbePorts(ports []uint16) []uint16 {
	out := slices.Clone(ports)
	return slices.DeleteFunc(out, func(p uint16) bool { return p == ProbePort || p == 0 || agentPort(p) })
}

// setExcluded makes the pod's excluded outbound and inbound ports, and its
// probe ports open to the node, exactly out, in and node: it adds the new
// ones first, then drops the others, so a port in a set before and after
// is never out of it in between.
func (c *Capture) setExcluded(cookie uint64, out, in, node []uint16) error {
	for _, set := range []struct {
		m     *ebpf.Map
		ports []uint16
		what  string
	}{{c.objs.Excluded, out, "outbound"}, {c.objs.InboundExcluded, in, "inbound"}, {c.objs.NodeProbePorts, node, "node probe"}} {
		for _, port := range set.ports {
			if err := set.m.Update(capturePortKey{Netns: cookie, Port: uint32(port)}, uint8(1), ebpf.UpdateAny); err != nil {
				return fmt.Errorf("excluding %s port %d: %w", set.what, port, err)
			}
		}
		if err := pruneExcluded(set.m, cookie, set.ports); err != nil {
			return fmt.Errorf("%s exclusions: %w", set.what, err)
		}
	}
	return nil
}

// pruneExcluded removes cookie's ports in m (excluded or inbound_excluded)
// that are not in keep.
func pruneExcluded(m *ebpf.Map, cookie uint64, keep []uint16) error {
	var k capturePortKey
	var v uint8
	var drop []capturePortKey
	it := m.Iterate()
	for it.Next(&k, &v) {
		if k.Netns == cookie && !slices.Contains(keep, uint16(k.Port)) {
			drop = append(drop, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading excluded ports: %w", err)
	}
	for _, k := range drop {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("removing excluded port %d: %w", k.Port, err)
		}
	}
	return nil
}

// agentPort reports whether port is one of the agent's own (docs/capture.md).
func agentPort(port uint16) bool {
	switch port {
	case 15000, 15001, 15006, 15008, 15020, 15021:
		return true
	}
	return false
}

// Unenroll gives the pod plain networking back: new connects are no longer
// redirected, inbound is no longer steered, and the agent's listeners in
// the pod are closed. Connections already accepted stay open.
func (c *Capture) Unenroll(ep *EnrolledPod) error {
	return c.UnenrollCookie(ep.Cookie)
}

// UnenrollCookie unenrolls the pod with the given netns cookie (see
// AdoptedPods).
func (c *Capture) UnenrollCookie(cookie uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	p, ok := c.pods[cookie]
	if !ok {
		return fmt.Errorf("unenrolling netns cookie %d: not enrolled", cookie)
	}
	err := c.dropPod(cookie, p)
	delete(c.pods, cookie)
	if err != nil {
		return fmt.Errorf("unenrolling netns cookie %d: %w", cookie, err)
	}
	return nil
}

// dropPod removes a pod from every map, detaches its sk_lookup program and
// closes its listeners, in that order.
func (c *Capture) dropPod(cookie uint64, p *podState) error {
	var errs []error
	ignore := func(err error) error {
		if errors.Is(err, ebpf.ErrKeyNotExist) || errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	errs = append(errs, ignore(c.objs.Enrolled.Delete(cookie)))
	errs = append(errs, pruneExcluded(c.objs.Excluded, cookie, nil), pruneExcluded(c.objs.InboundExcluded, cookie, nil),
		pruneExcluded(c.objs.NodeProbePorts, cookie, nil))
	for _, ip := range p.ips {
		// The address may belong to a newer pod by now; leave its entry.
		fam, a := keyFromIP(ip)
		k := captureIpKey{Family: fam, Addr: a}
		var v captureInboundVal
		if err := c.objs.Inbound.Lookup(k, &v); err == nil && v.Netns == cookie {
			errs = append(errs, ignore(c.objs.Inbound.Delete(k)))
		}
	}
	if p.link != nil {
		errs = append(errs, ignore(p.link.Unpin()), p.link.Close())
	} else {
		errs = append(errs, ignore(os.Remove(filepath.Join(c.podsDir, cookieName(cookie)))))
	}
	for _, s := range p.slots {
		// The kernel empties a SOCKMAP slot itself when its socket closes,
		// and deleting an empty slot fails with EINVAL: nothing to undo.
		if err := ignore(c.objs.InboundSocks.Delete(s)); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, err)
		}
		delete(c.slots, s)
	}
	p.closeListeners()
	return errors.Join(errs...)
}
