package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
)

// netPol is a compiled NetworkPolicy.
type netPol struct {
	ref          PolicyRef
	podSel       labels.Selector
	ingress      bool // policyTypes include Ingress: selected pods are isolated for ingress
	egress       bool
	ingressRules []npRule
	egressRules  []npRule
	refused      error // non-nil: a fail-closed stand-in (isolates, allows nothing)
}

// npRule is one ingress or egress rule. allPeers: from/to was empty (every
// peer); allPorts: ports was empty (every port and protocol).
type npRule struct {
	allPeers bool
	peers    []npPeer
	allPorts bool
	ports    []npPort
}

type npPeer struct {
	podSel  labels.Selector // nil: not set
	nsSel   labels.Selector // nil: not set (the policy's own namespace)
	ipBlock bool
	cidr    netip.Prefix
	except  []netip.Prefix
}

type npPort struct {
	proto   corev1.Protocol
	anyPort bool
	named   string
	port    int32
	end     int32
}

func compileNetworkPolicy(np *networkingv1.NetworkPolicy) (*netPol, error) {
	c := &netPol{ref: PolicyRef{Kind: KindNetworkPolicy, Namespace: np.Namespace, Name: np.Name}}
	err := c.compile(np)
	if err != nil {
		// Fail closed: keep isolating the pods the policy was meant to select
		// (all pods of the namespace if even the selector is unusable) for the
		// directions it names, and allow nothing through it.
		c.refused = err
		c.ingressRules, c.egressRules = nil, nil
		if c.podSel == nil {
			c.podSel = labels.Everything()
		}
		if !c.ingress && !c.egress {
			c.ingress, c.egress = true, true
		}
	}
	return c, err
}

func (c *netPol) compile(np *networkingv1.NetworkPolicy) error {
	if np.Namespace == "" {
		return errors.New("metadata.namespace is empty: a NetworkPolicy only applies inside its namespace")
	}
	if np.Name == "" {
		return errors.New("metadata.name is empty")
	}
	sel, err := compileLabelSelector(&np.Spec.PodSelector)
	if err != nil {
		return fmt.Errorf("spec.podSelector: %w", err)
	}
	c.podSel = sel
	// policyTypes defaulting (networking.k8s.io/v1): Ingress always, Egress
	// when the policy has egress rules.
	if len(np.Spec.PolicyTypes) == 0 {
		c.ingress = true
		c.egress = len(np.Spec.Egress) > 0
	}
	for i, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			c.ingress = true
		case networkingv1.PolicyTypeEgress:
			c.egress = true
		default:
			// Set what we can so the stand-in still isolates.
			c.ingress, c.egress = true, true
			return fmt.Errorf("spec.policyTypes[%d]: unknown type %q (want Ingress or Egress)", i, t)
		}
	}
	for i, r := range np.Spec.Ingress {
		rule, err := compileNPRule(r.From, r.Ports)
		if err != nil {
			return fmt.Errorf("spec.ingress[%d]: %w", i, err)
		}
		c.ingressRules = append(c.ingressRules, rule)
	}
	for i, r := range np.Spec.Egress {
		rule, err := compileNPRule(r.To, r.Ports)
		if err != nil {
			return fmt.Errorf("spec.egress[%d]: %w", i, err)
		}
		c.egressRules = append(c.egressRules, rule)
	}
	return nil
}

func compileNPRule(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort) (npRule, error) {
	var r npRule
	r.allPeers = len(peers) == 0
	r.allPorts = len(ports) == 0
	for i, p := range peers {
		cp, err := compileNPPeer(p)
		if err != nil {
			return r, fmt.Errorf("peer %d: %w", i, err)
		}
		r.peers = append(r.peers, cp)
	}
	for i, p := range ports {
		cp, err := compileNPPort(p)
		if err != nil {
			return r, fmt.Errorf("ports[%d]: %w", i, err)
		}
		r.ports = append(r.ports, cp)
	}
	return r, nil
}

func compileNPPeer(p networkingv1.NetworkPolicyPeer) (npPeer, error) {
	var out npPeer
	if p.IPBlock != nil {
		if p.PodSelector != nil || p.NamespaceSelector != nil {
			return out, errors.New("ipBlock cannot be combined with podSelector or namespaceSelector in one peer; use separate peers")
		}
		cidr, err := parseCIDR(p.IPBlock.CIDR)
		if err != nil {
			return out, fmt.Errorf("ipBlock.cidr: %w", err)
		}
		out.ipBlock = true
		out.cidr = cidr
		for j, e := range p.IPBlock.Except {
			ex, err := parseCIDR(e)
			if err != nil {
				return out, fmt.Errorf("ipBlock.except[%d]: %w", j, err)
			}
			if ex.Addr().Is4() != cidr.Addr().Is4() || ex.Bits() < cidr.Bits() || !cidr.Contains(ex.Addr()) {
				return out, fmt.Errorf("ipBlock.except[%d]: %s is not inside cidr %s", j, ex, cidr)
			}
			out.except = append(out.except, ex)
		}
		return out, nil
	}
	if p.PodSelector == nil && p.NamespaceSelector == nil {
		return out, errors.New("peer sets none of podSelector, namespaceSelector, ipBlock")
	}
	if p.PodSelector != nil {
		sel, err := compileLabelSelector(p.PodSelector)
		if err != nil {
			return out, fmt.Errorf("podSelector: %w", err)
		}
		out.podSel = sel
	}
	if p.NamespaceSelector != nil {
		sel, err := compileLabelSelector(p.NamespaceSelector)
		if err != nil {
			return out, fmt.Errorf("namespaceSelector: %w", err)
		}
		out.nsSel = sel
	}
	return out, nil
}

// parseCIDR accepts a.b.c.d/n and IPv6 prefixes; like the API server it
// accepts host bits set and masks them.
func parseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("parsing CIDR %q: %w", s, err)
	}
	if p.Addr().Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("parsing CIDR %q: zones are not allowed", s)
	}
	out := netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-unmapBits(p.Addr())).Masked()
	if !out.IsValid() {
		// An IPv4-mapped prefix shorter than /96 has no IPv4 equivalent. An
		// invalid prefix would match nothing, which in an except or
		// notIpBlocks list would widen access: refuse it.
		return netip.Prefix{}, fmt.Errorf("parsing CIDR %q: an IPv4-mapped prefix must be /96 or longer", s)
	}
	return out, nil
}

func unmapBits(a netip.Addr) int {
	if a.Is4In6() {
		return 96
	}
	return 0
}

func compileNPPort(p networkingv1.NetworkPolicyPort) (npPort, error) {
	out := npPort{proto: corev1.ProtocolTCP}
	if p.Protocol != nil {
		out.proto = *p.Protocol
	}
	if err := checkProtocol(out.proto); err != nil {
		return out, err
	}
	if p.Port == nil {
		if p.EndPort != nil {
			return out, errors.New("endPort needs port")
		}
		out.anyPort = true
		return out, nil
	}
	if p.Port.Type == intstr.String {
		name := p.Port.StrVal
		if errs := validation.IsValidPortName(name); len(errs) > 0 {
			return out, fmt.Errorf("port %q: not a valid port name: %s", name, strings.Join(errs, "; "))
		}
		if p.EndPort != nil {
			return out, fmt.Errorf("endPort cannot be used with the named port %q", name)
		}
		out.named = name
		return out, nil
	}
	v := p.Port.IntVal
	if v < 1 || v > 65535 {
		return out, fmt.Errorf("port %d: out of range 1-65535", v)
	}
	out.port, out.end = v, v
	if p.EndPort != nil {
		e := *p.EndPort
		if e < v || e > 65535 {
			return out, fmt.Errorf("endPort %d: must be between port %d and 65535", e, v)
		}
		out.end = e
	}
	return out, nil
}

func checkProtocol(p corev1.Protocol) error {
	switch p {
	case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
		return nil
	}
	return fmt.Errorf("protocol %q: want TCP, UDP or SCTP", p)
}

// endpoint is one side of a flow as the engine resolved it.
type endpoint struct {
	ip  netip.Addr
	pod *podEntry // nil: not a (non-host-network) pod in the snapshot
}

func (s *Snapshot) peerMatches(policyNS string, p *npPeer, peer endpoint) bool {
	if p.ipBlock {
		if !peer.ip.IsValid() || !p.cidr.Contains(peer.ip) {
			return false
		}
		for _, e := range p.except {
			if e.Contains(peer.ip) {
				return false
			}
		}
		return true
	}
	if peer.pod == nil || peer.pod.HostNetwork {
		return false
	}
	if p.nsSel != nil {
		if !p.nsSel.Matches(labelSet(s.namespaces.Lookup(peer.pod.Namespace))) {
			return false
		}
	} else if peer.pod.Namespace != policyNS {
		return false
	}
	if p.podSel != nil && !p.podSel.Matches(labelSet(peer.pod.Labels)) {
		return false
	}
	return true
}

// portMatches: named ports resolve against the destination pod's container
// ports with the same protocol; a destination that is not a pod has none.
func (p *npPort) matches(proto corev1.Protocol, port uint16, dst *podEntry) bool {
	if p.proto != proto {
		return false
	}
	if p.anyPort {
		return true
	}
	if p.named != "" {
		if dst == nil {
			return false
		}
		for _, cp := range dst.Ports {
			if cp.Name == p.named && protoOrTCP(cp.Protocol) == proto && cp.Port == int32(port) {
				return true
			}
		}
		return false
	}
	return int32(port) >= p.port && int32(port) <= p.end
}

func protoOrTCP(p corev1.Protocol) corev1.Protocol {
	if p == "" {
		return corev1.ProtocolTCP
	}
	return p
}

// evalNetPol evaluates the NetworkPolicies of one direction for the selected
// pod `self` and the remote end `peer`; dst is the destination pod for port
// resolution.
func (s *Snapshot) evalNetPol(dir Direction, self *podEntry, peer endpoint, dst *podEntry, f *Flow) Step {
	st := Step{Direction: dir, Check: CheckNetworkPolicy, Rule: -1}
	pols := self.ingressNPs
	if dir == Egress {
		pols = self.egressNPs
	}
	if len(pols) == 0 {
		st.Verdict = Allow
		st.Reason = fmt.Sprintf("no NetworkPolicy selects %s for %s; not isolated", self.Key(), dir)
		return st
	}
	for _, np := range pols {
		rules := np.ingressRules
		if dir == Egress {
			rules = np.egressRules
		}
		for i := range rules {
			r := &rules[i]
			if !s.ruleMatches(np.ref.Namespace, r, peer, dst, f) {
				continue
			}
			st.Verdict = Allow
			st.Policy = np.ref
			st.Rule = i
			st.Reason = fmt.Sprintf("%s rule %d of %s allows it", dir, i, np.ref)
			return st
		}
	}
	st.Verdict = Deny
	st.Policy = pols[0].ref
	names := make([]string, 0, len(pols))
	for _, np := range pols {
		n := np.ref.Namespace + "/" + np.ref.Name
		if np.refused != nil {
			n += " (refused: " + np.refused.Error() + ")"
		}
		names = append(names, n)
	}
	st.Reason = fmt.Sprintf("%s is isolated for %s by NetworkPolicy %s and no rule allows %s", self.Key(), dir, strings.Join(names, ", "), describePeerPort(dir, peer, f))
	return st
}

func describePeerPort(dir Direction, peer endpoint, f *Flow) string {
	who := peer.ip.String()
	if peer.pod != nil {
		who = peer.pod.Key() + " (" + peer.ip.String() + ")"
	}
	if dir == Ingress {
		return fmt.Sprintf("from %s to port %d/%s", who, f.Port, f.Protocol)
	}
	return fmt.Sprintf("to %s port %d/%s", who, f.Port, f.Protocol)
}

func (s *Snapshot) ruleMatches(policyNS string, r *npRule, peer endpoint, dst *podEntry, f *Flow) bool {
	if !r.allPorts {
		ok := false
		for i := range r.ports {
			if r.ports[i].matches(f.Protocol, f.Port, dst) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if r.allPeers {
		return true
	}
	for i := range r.peers {
		if s.peerMatches(policyNS, &r.peers[i], peer) {
			return true
		}
	}
	return false
}
