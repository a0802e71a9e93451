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
	for _, kv := range [][2]string{
		{"net/ipv4/ip_forward", "1"},
		{"net/ipv4/conf/all/rp_filter", "0"},
		{"net/ipv4/conf/default/rp_filter", "0"},
		{"net/ipv6/conf/all/disable_ipv6", "1"},
		{"net/ipv6/conf/default/disable_ipv6", "1"},
	} {
		if err := netns.WriteSysctl(n.Netns, kv[0], kv[1]); err != nil && kv[0] != "net/ipv6/conf/all/disable_ipv6" && kv[0] != "net/ipv6/conf/default/disable_ipv6" {
			return fmt.Errorf("configuring node %s: %w", n.Name, err)
		}
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
	for _, o := range sortedNodes(all) {
		if o.Name != n.Name {
			lines = append(lines, "route add "+o.PodCIDR+" via "+o.IP+" dev eth0")
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
	_ = netns.WriteSysctl(p.Netns, "net/ipv6/conf/all/disable_ipv6", "1")
	_ = netns.WriteSysctl(p.Netns, "net/ipv6/conf/default/disable_ipv6", "1")
	if err := netns.IP(ctx, filepath.Base(n.Netns), []string{
		"link add " + p.Link + " type veth peer name eth0 netns " + ns,
		"link set dev " + p.Link + " up",
		"route add " + p.IP + "/32 dev " + p.Link + " scope link",
	}); err != nil {
		return fmt.Errorf("creating the veth of pod %s: %w", p.Key(), err)
	}
	if err := netns.IP(ctx, ns, []string{
		"link set dev lo up",
		"addr add " + p.IP + "/32 dev eth0",
		"link set dev eth0 up",
		"route add " + n.Gateway + " dev eth0 scope link",
		"route add default via " + n.Gateway + " dev eth0",
	}); err != nil {
		return fmt.Errorf("configuring pod %s: %w", p.Key(), err)
	}
	return nil
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
