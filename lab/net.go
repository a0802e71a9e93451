package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/spec"
)

// setupBridge creates the underlay bridge in the root namespace. It has no
// address and no uplink: nothing from the lab reaches the real network and
// the host has no route into the lab.
func (l *Lab) setupBridge(ctx context.Context) error {
	br := l.names.bridge()
	if err := netns.IP(ctx, "", []string{
		"link add " + br + " type bridge",
		"link set dev " + br + " addrgenmode none",
	}); err != nil {
		return fmt.Errorf("creating the underlay bridge: %w", err)
	}
	// Bridged frames must not traverse the host's netfilter (br_netfilter
	// may be loaded); a bridge-level switch keeps the rest of the host as it is.
	if err := netns.IP(ctx, "", []string{"link set dev " + br + " type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0"}); err != nil {
		l.log.Debug("cannot switch off netfilter calls on the bridge", "err", err)
	}
	if l.ipv6() {
		// Without an MLD querier on the underlay, snooping could stop the
		// neighbour solicitations that IPv6 between nodes needs.
		if err := netns.IP(ctx, "", []string{"link set dev " + br + " type bridge mcast_snooping 0"}); err != nil {
			return fmt.Errorf("switching off multicast snooping on the underlay bridge (network.ipv6): %w", err)
		}
	}
	if err := netns.IP(ctx, "", []string{"link set dev " + br + " up"}); err != nil {
		return fmt.Errorf("bringing up the underlay bridge: %w", err)
	}
	return nil
}

// setupNode creates a node's namespace, its leg on the bridge, its
// forwarding and its routes to every other node's pods.
func (l *Lab) setupNode(ctx context.Context, n *Node, all map[string]*Node) error {
	ns := filepath.Base(n.Netns)
	if err := netns.IP(ctx, "", []string{
		"netns add " + ns,
		"link add " + n.Link + " type veth peer name eth0 netns " + ns,
		"link set dev " + n.Link + " addrgenmode none",
		"link set dev " + n.Link + " master " + l.names.bridge(),
		"link set dev " + n.Link + " up",
	}); err != nil {
		return fmt.Errorf("creating node %s: %w", n.Name, err)
	}
	v6 := l.ipv6()
	sysctls := [][2]string{
		{"net/ipv4/ip_forward", "1"},
		{"net/ipv4/conf/all/rp_filter", "0"},
		{"net/ipv4/conf/default/rp_filter", "0"},
	}
	if v6 {
		sysctls = append(sysctls, [][2]string{
			{"net/ipv6/conf/all/disable_ipv6", "0"},
			{"net/ipv6/conf/default/disable_ipv6", "0"},
			{"net/ipv6/conf/all/forwarding", "1"},
		}...)
	}
	for _, kv := range sysctls {
		if err := netns.WriteSysctl(n.Netns, kv[0], kv[1]); err != nil {
			return fmt.Errorf("configuring node %s: %w", n.Name, err)
		}
	}
	if !v6 {
		// Best effort: a kernel without IPv6 has nothing to switch off.
		_ = netns.WriteSysctl(n.Netns, "net/ipv6/conf/all/disable_ipv6", "1")
		_ = netns.WriteSysctl(n.Netns, "net/ipv6/conf/default/disable_ipv6", "1")
	}
	lines := []string{
		"link set dev lo up",
		"addr add " + n.Gateway + "/32 dev lo",
		"addr add " + n.IP + "/" + strconv.Itoa(l.underlay.Bits()) + " dev eth0",
		"link set dev eth0 up",
		// Locally generated connects to a ClusterIP need a route before
		// the nat/output hook rewrites them.
		"route add " + l.st.APIServer.ServiceCIDR + " dev eth0",
	}
	if v6 {
		lines = append(lines, "addr add "+n.IP6+"/96 dev eth0 nodad")
	}
	for _, o := range sortedNodes(all) {
		if o.Name != n.Name {
			lines = append(lines, "route add "+o.PodCIDR+" via "+o.IP+" dev eth0")
			if v6 {
				pfx6, err := embedPrefix6(pod6Prefix, o.PodCIDR)
				if err != nil {
					return fmt.Errorf("configuring node %s: %w", n.Name, err)
				}
				lines = append(lines, "route add "+pfx6.String()+" via "+o.IP6+" dev eth0")
			}
		}
	}
	if err := netns.IP(ctx, ns, lines); err != nil {
		return fmt.Errorf("configuring node %s: %w", n.Name, err)
	}
	return nil
}

// setupPodNet creates a pod's namespace and its veth to the node: the pod
// has its IP as a /32 and a default route via the node's gateway address;
// the node has a /32 route to the pod.
func (l *Lab) setupPodNet(ctx context.Context, p *Pod, n *Node) error {
	ns := filepath.Base(p.Netns)
	if err := netns.IP(ctx, "", []string{"netns add " + ns}); err != nil {
		return fmt.Errorf("creating pod %s: %w", p.Key(), err)
	}
	v6 := l.ipv6() && p.IP6 != ""
	if v6 {
		// Set before the veth exists, so its end in the pod takes them:
		// addresses are usable at once (no duplicate address detection
		// wait), as a CNI plugin configures them.
		for _, kv := range [][2]string{
			{"net/ipv6/conf/all/disable_ipv6", "0"},
			{"net/ipv6/conf/default/disable_ipv6", "0"},
			{"net/ipv6/conf/all/accept_dad", "0"},
			{"net/ipv6/conf/default/accept_dad", "0"},
		} {
			if err := netns.WriteSysctl(p.Netns, kv[0], kv[1]); err != nil {
				return fmt.Errorf("configuring IPv6 in pod %s: %w", p.Key(), err)
			}
		}
	} else {
		_ = netns.WriteSysctl(p.Netns, "net/ipv6/conf/all/disable_ipv6", "1")
		_ = netns.WriteSysctl(p.Netns, "net/ipv6/conf/default/disable_ipv6", "1")
	}
	nodeLines := []string{
		"link add " + p.Link + " type veth peer name eth0 netns " + ns,
		"link set dev " + p.Link + " up",
		"route add " + p.IP + "/32 dev " + p.Link + " scope link",
	}
	if v6 {
		nodeLines = append(nodeLines,
			"addr add "+podGateway6+"/64 dev "+p.Link+" nodad",
			"route add "+p.IP6+"/128 dev "+p.Link)
	}
	if err := netns.IP(ctx, filepath.Base(n.Netns), nodeLines); err != nil {
		return fmt.Errorf("creating the veth of pod %s: %w", p.Key(), err)
	}
	podLines := []string{
		"link set dev lo up",
		"addr add " + p.IP + "/32 dev eth0",
		"link set dev eth0 up",
		"route add " + n.Gateway + " dev eth0 scope link",
		"route add default via " + n.Gateway + " dev eth0",
	}
	if v6 {
		podLines = append(podLines,
			"addr add "+p.IP6+"/128 dev eth0 nodad",
			"route add ::/0 via "+podGateway6+" dev eth0")
	}
	if err := netns.IP(ctx, ns, podLines); err != nil {
		return fmt.Errorf("configuring pod %s: %w", p.Key(), err)
	}
	return nil
}

// The lab's IPv6 plan (network.ipv6). Every IPv6 address is an IPv4
// address of the lab embedded in the low 32 bits of a /96, so the two
// plans never disagree and nothing new has to be allocated.
var (
	pod6Prefix  = netip.MustParsePrefix("fd4e:4d:0:1::/96")
	node6Prefix = netip.MustParsePrefix("fd4e:4d:0:2::/96")
)

// podGateway6 is the node's address on every pod veth, the pods' default
// IPv6 gateway (link-local, as Calico and Cilium do it).
const podGateway6 = "fe80::1"

func (l *Lab) ipv6() bool { return l.st.Spec != nil && l.st.Spec.Network.IPv6 }

// embed6 returns the IPv6 address of pfx (a /96) that carries v4.
func embed6(pfx netip.Prefix, v4 string) (netip.Addr, error) {
	a, err := netip.ParseAddr(v4)
	if err != nil || !a.Is4() {
		return netip.Addr{}, fmt.Errorf("%q is not an IPv4 address", v4)
	}
	b := pfx.Masked().Addr().As16()
	a4 := a.As4()
	copy(b[12:], a4[:])
	return netip.AddrFrom16(b), nil
}

// embedPrefix6 returns the IPv6 prefix of pfx (a /96) that carries the
// IPv4 prefix v4.
func embedPrefix6(pfx netip.Prefix, v4 string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(v4)
	if err != nil || !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("%q is not an IPv4 prefix", v4)
	}
	a, err := embed6(pfx, p.Masked().Addr().String())
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, 96+p.Bits()), nil
}

// teardownPodNet removes a pod's veth pair and namespace. The veth is
// deleted first and explicitly: a namespace is destroyed asynchronously
// after `ip netns del`, so the node's end of the pair (and its name, which
// the next pod on that index reuses) could otherwise outlive the call.
func teardownPodNet(ctx context.Context, p *Pod) error {
	if _, err := os.Stat(p.Netns); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	// Deleting one end deletes the pair and the node's route, at once. It
	// fails only when the veth was never made or is gone already.
	_ = netns.IP(ctx, filepath.Base(p.Netns), []string{"link del dev eth0"})
	if err := netns.IP(ctx, "", []string{"netns del " + filepath.Base(p.Netns)}); err != nil {
		return fmt.Errorf("removing the network namespace of pod %s: %w", p.Key(), err)
	}
	return nil
}

// allocPod picks the lowest free index on the node and the matching IP:
// index i gets the (i+2)th address of the pod CIDR (.0 is the network,
// .1 the gateway).
func (l *Lab) allocPod(n *Node) (int, string, error) {
	used := map[int]bool{}
	for _, p := range l.st.Pods {
		if p.Node == n.Name {
			used[p.Index] = true
		}
	}
	pfx, err := netip.ParsePrefix(n.PodCIDR)
	if err != nil {
		return 0, "", fmt.Errorf("node %s pod CIDR: %w", n.Name, err)
	}
	size := 1 << (32 - pfx.Bits())
	for i := 0; i < spec.MaxPodsPerNode && i+2 < size-1; i++ {
		if used[i] {
			continue
		}
		a := pfx.Masked().Addr().As4()
		v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
		v += uint32(i + 2)
		ip := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		return i, ip.String(), nil
	}
	return 0, "", fmt.Errorf("node %s has no free address left in %s", n.Name, n.PodCIDR)
}

func gatewayOf(podCIDR string) (string, error) {
	pfx, err := netip.ParsePrefix(podCIDR)
	if err != nil {
		return "", fmt.Errorf("parsing pod CIDR %q: %w", podCIDR, err)
	}
	return pfx.Masked().Addr().Next().String(), nil
}
