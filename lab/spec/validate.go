package spec

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
)

// ReservedAnnotationPrefix is the annotation prefix the lab writes itself
// (netns and cgroup paths); specs may not set it.
const ReservedAnnotationPrefix = "lab.nodemesh.io/"

// Limits that keep names and link indexes within what the kernel allows.
const (
	MaxNodes       = 64
	MaxPodsPerNode = 250
)

// Default fills in defaults. It is idempotent and leaves invalid values
// alone for Validate to report.
func (s *Spec) Default() {
	if s.Network.Underlay == "" {
		s.Network.Underlay = DefaultUnderlay
	}
	if s.Network.ClusterCIDR == "" {
		s.Network.ClusterCIDR = DefaultClusterCIDR
	}
	if s.Network.ServiceCIDR == "" {
		s.Network.ServiceCIDR = DefaultServiceCIDR
	}
	under, uerr := netip.ParsePrefix(s.Network.Underlay)
	cluster, cerr := netip.ParsePrefix(s.Network.ClusterCIDR)
	for i := range s.Nodes {
		n := &s.Nodes[i]
		if n.IP == "" && uerr == nil && under.Addr().Is4() {
			if a, ok := nthAddr(under.Masked().Addr(), i+1); ok {
				n.IP = a.String()
			}
		}
		if n.PodCIDR == "" && cerr == nil && cluster.Addr().Is4() && cluster.Bits() <= 24 {
			if a, ok := nthAddr(cluster.Masked().Addr(), (i+1)*256); ok && cluster.Contains(a) {
				n.PodCIDR = netip.PrefixFrom(a, 24).String()
			}
		}
	}
	for i := range s.Pods {
		p := &s.Pods[i]
		if p.Namespace == "" {
			p.Namespace = DefaultNamespace
		}
		if p.ServiceAccount == "" {
			p.ServiceAccount = DefaultSA
		}
		for j := range p.Ports {
			if p.Ports[j].Protocol == "" {
				p.Ports[j].Protocol = "TCP"
			}
		}
	}
	for i := range s.Services {
		svc := &s.Services[i]
		if svc.Namespace == "" {
			svc.Namespace = DefaultNamespace
		}
		for j := range svc.Ports {
			sp := &svc.Ports[j]
			if sp.Protocol == "" {
				sp.Protocol = "TCP"
			}
			if sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal == 0 {
				sp.TargetPort = intstr.FromInt32(sp.Port)
			}
		}
	}
}

// nthAddr returns base+n for an IPv4 base, or false on overflow.
func nthAddr(base netip.Addr, n int) (netip.Addr, bool) {
	b := base.As4()
	v := uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])
	v += uint64(n)
	if v > 0xffffffff {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

// Validate checks a defaulted spec. It reports every problem it finds,
// each naming file, field and fix, joined with errors.Join.
func (s *Spec) Validate(file string) error {
	if file == "" {
		file = "<spec>"
	}
	v := &validator{file: file}
	v.run(s)
	return errors.Join(v.errs...)
}

type validator struct {
	file string
	errs []error
}

func (v *validator) add(field, msg, fix string) {
	v.errs = append(v.errs, &Error{File: v.file, Field: field, Msg: msg, Fix: fix})
}

type namedPrefix struct {
	field string
	p     netip.Prefix
}

func (v *validator) prefix(field, val string) (netip.Prefix, bool) {
	p, err := netip.ParsePrefix(val)
	switch {
	case err != nil:
		v.add(field, fmt.Sprintf("%q is not an IPv4 CIDR", val), "write it like 10.244.1.0/24")
		return p, false
	case !p.Addr().Is4():
		v.add(field, fmt.Sprintf("%q is not IPv4; the lab is IPv4-only", val), "use an IPv4 CIDR")
		return p, false
	case p.Masked() != p:
		v.add(field, fmt.Sprintf("%q has host bits set", val), "use "+p.Masked().String())
		return p, false
	case p.Bits() > 30:
		v.add(field, fmt.Sprintf("%q is too small", val), "use a /30 or larger")
		return p, false
	}
	return p, true
}

func (v *validator) labels(field string, m map[string]string) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		f := fmt.Sprintf("%s[%q]", field, k)
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			v.add(f, "invalid label key: "+strings.Join(errs, "; "), "")
		}
		if errs := validation.IsValidLabelValue(m[k]); len(errs) > 0 {
			v.add(f, "invalid label value: "+strings.Join(errs, "; "), "")
		}
	}
}

func (v *validator) run(s *Spec) {
	if s.APIVersion != "" && s.APIVersion != APIVersion {
		v.add("apiVersion", fmt.Sprintf("%q is not supported", s.APIVersion), "use "+APIVersion+" or leave it out")
	}
	if s.Kind != "" && s.Kind != Kind {
		v.add("kind", fmt.Sprintf("%q is not supported", s.Kind), "use "+Kind+" or leave it out")
	}

	// Address plan: the underlay, every node's pod CIDR and the service
	// range must be pairwise disjoint.
	var prefixes []namedPrefix
	under, underOK := v.prefix("network.underlay", s.Network.Underlay)
	if underOK {
		prefixes = append(prefixes, namedPrefix{"network.underlay", under})
	}
	v.prefix("network.clusterCIDR", s.Network.ClusterCIDR)
	if svc, ok := v.prefix("network.serviceCIDR", s.Network.ServiceCIDR); ok {
		prefixes = append(prefixes, namedPrefix{"network.serviceCIDR", svc})
	}

	if len(s.Nodes) == 0 {
		v.add("nodes", "no nodes", "declare at least one node, e.g. nodes: [{name: node-1}]")
	}
	if len(s.Nodes) > MaxNodes {
		v.add("nodes", fmt.Sprintf("%d nodes, more than the %d supported", len(s.Nodes), MaxNodes), "")
	}
	nodeNames := map[string]int{}
	nodeIPs := map[netip.Addr]string{}
	for i, n := range s.Nodes {
		f := fmt.Sprintf("nodes[%d]", i)
		if errs := validation.IsDNS1123Label(n.Name); len(errs) > 0 {
			v.add(f+".name", fmt.Sprintf("%q is not a valid node name: %s", n.Name, strings.Join(errs, "; ")), "use lower-case letters, digits and '-', like node-1")
		} else if len(n.Name) > 40 {
			v.add(f+".name", fmt.Sprintf("%q is longer than 40 characters", n.Name), "use a shorter name")
		}
		if j, dup := nodeNames[n.Name]; dup {
			v.add(f+".name", fmt.Sprintf("duplicate node name %q (also nodes[%d])", n.Name, j), "give every node its own name")
		} else {
			nodeNames[n.Name] = i
		}
		v.labels(f+".labels", n.Labels)
		ip, err := netip.ParseAddr(n.IP)
		switch {
		case err != nil || !ip.Is4():
			v.add(f+".ip", fmt.Sprintf("%q is not an IPv4 address", n.IP), "leave it out to take one from network.underlay")
		case underOK && !under.Contains(ip):
			v.add(f+".ip", fmt.Sprintf("%s is outside network.underlay %s", ip, under), "pick an address inside the underlay, or leave it out")
		case underOK && (ip == under.Addr() || ip == lastAddr(under)):
			v.add(f+".ip", fmt.Sprintf("%s is the network or broadcast address of %s", ip, under), "pick another address")
		default:
			if other, dup := nodeIPs[ip]; dup {
				v.add(f+".ip", fmt.Sprintf("%s is also the address of node %q", ip, other), "give every node its own IP")
			} else {
				nodeIPs[ip] = n.Name
			}
		}
		if n.PodCIDR == "" {
			v.add(f+".podCIDR", "no pod CIDR and none could be taken from network.clusterCIDR "+s.Network.ClusterCIDR, "set podCIDR, or use a clusterCIDR of /16 or larger")
		} else if p, ok := v.prefix(f+".podCIDR", n.PodCIDR); ok {
			if p.Bits() > 28 {
				v.add(f+".podCIDR", fmt.Sprintf("%s is too small for pods", p), "use a /28 or larger (a /24 is usual)")
			} else {
				prefixes = append(prefixes, namedPrefix{f + ".podCIDR", p})
			}
		}
	}
	// Room for the pods: .0 is the network, .1 the node's gateway, the
	// last address the broadcast.
	capacity := map[string]int{}
	for _, n := range s.Nodes {
		if p, err := netip.ParsePrefix(n.PodCIDR); err == nil && p.Addr().Is4() && p.Bits() <= 28 {
			capacity[n.Name] = min((1<<(32-p.Bits()))-3, MaxPodsPerNode)
		}
	}
	for i := 0; i < len(prefixes); i++ {
		for j := i + 1; j < len(prefixes); j++ {
			if prefixes[i].p.Overlaps(prefixes[j].p) {
				v.add(prefixes[j].field, fmt.Sprintf("%s overlaps %s (%s)", prefixes[j].p, prefixes[i].field, prefixes[i].p), "use disjoint ranges")
			}
		}
	}

	nsNames := map[string]int{}
	for i, ns := range s.Namespaces {
		f := fmt.Sprintf("namespaces[%d]", i)
		if errs := validation.IsDNS1123Label(ns.Name); len(errs) > 0 {
			v.add(f+".name", fmt.Sprintf("%q is not a valid namespace name: %s", ns.Name, strings.Join(errs, "; ")), "use lower-case letters, digits and '-'")
		}
		if j, dup := nsNames[ns.Name]; dup {
			v.add(f+".name", fmt.Sprintf("duplicate namespace %q (also namespaces[%d])", ns.Name, j), "declare each namespace once")
		} else {
			nsNames[ns.Name] = i
		}
		v.labels(f+".labels", ns.Labels)
	}
	nsKnown := func(name string) bool {
		_, ok := nsNames[name]
		return ok || name == DefaultNamespace
	}
	declared := func() string {
		names := []string{DefaultNamespace}
		for _, ns := range s.Namespaces {
			if ns.Name != DefaultNamespace {
				names = append(names, ns.Name)
			}
		}
		return strings.Join(names, ", ")
	}

	podKeys := map[string]int{}
	perNode := map[string]int{}
	for i := range s.Pods {
		p := &s.Pods[i]
		f := fmt.Sprintf("pods[%d]", i)
		if errs := validation.IsDNS1123Subdomain(p.Name); len(errs) > 0 {
			v.add(f+".name", fmt.Sprintf("%q is not a valid pod name: %s", p.Name, strings.Join(errs, "; ")), "use lower-case letters, digits, '-' and '.'")
		} else if len(p.Name) > 63 {
			v.add(f+".name", fmt.Sprintf("%q is longer than 63 characters", p.Name), "use a shorter name")
		}
		if !nsKnown(p.Namespace) {
			v.add(f+".namespace", fmt.Sprintf("namespace %q is not declared", p.Namespace), "add it under namespaces:, or use one of: "+declared())
		}
		if j, dup := podKeys[p.Key()]; dup {
			v.add(f+".name", fmt.Sprintf("duplicate pod %s (also pods[%d])", p.Key(), j), "give every pod in a namespace its own name")
		} else {
			podKeys[p.Key()] = i
		}
		if _, ok := nodeNames[p.Node]; !ok {
			names := make([]string, 0, len(s.Nodes))
			for _, n := range s.Nodes {
				names = append(names, n.Name)
			}
			if p.Node == "" {
				v.add(f+".node", "no node", "set node: to one of: "+strings.Join(names, ", "))
			} else {
				v.add(f+".node", fmt.Sprintf("node %q is not declared", p.Node), "declare it under nodes:, or use one of: "+strings.Join(names, ", "))
			}
		} else {
			perNode[p.Node]++
			if c, ok := capacity[p.Node]; ok && perNode[p.Node] == c+1 {
				v.add(f+".node", fmt.Sprintf("node %q has room for %d pods and this is pod number %d", p.Node, c, c+1), "give the node a larger podCIDR or spread pods over more nodes")
			}
		}
		if errs := validation.IsDNS1123Subdomain(p.ServiceAccount); len(errs) > 0 {
			v.add(f+".serviceAccount", fmt.Sprintf("%q is not a valid service account name: %s", p.ServiceAccount, strings.Join(errs, "; ")), "")
		}
		v.labels(f+".labels", p.Labels)
		for k := range p.Annotations {
			af := fmt.Sprintf("%s.annotations[%q]", f, k)
			if errs := validation.IsQualifiedName(k); len(errs) > 0 {
				v.add(af, "invalid annotation key: "+strings.Join(errs, "; "), "")
			} else if strings.HasPrefix(k, ReservedAnnotationPrefix) {
				v.add(af, "the "+ReservedAnnotationPrefix+" prefix is written by the lab itself", "use another prefix")
			}
		}
		if len(p.Command) == 0 {
			v.add(f+".command", "no command", "give the argv to run, e.g. [nodemeshctl, lab, workload, http, --port, \"8080\"]")
		}
		for j, a := range p.Command {
			if a == "" && j == 0 {
				v.add(fmt.Sprintf("%s.command[0]", f), "empty program name", "")
			}
			if strings.ContainsRune(a, 0) {
				v.add(fmt.Sprintf("%s.command[%d]", f, j), "contains a NUL byte", "")
			}
		}
		portNames := map[string]bool{}
		portNums := map[string]bool{}
		for j, cp := range p.Ports {
			pf := fmt.Sprintf("%s.ports[%d]", f, j)
			if cp.ContainerPort < 1 || cp.ContainerPort > 65535 {
				v.add(pf+".containerPort", fmt.Sprintf("%d is not a port number", cp.ContainerPort), "use 1-65535")
			}
			if cp.Protocol != "TCP" && cp.Protocol != "UDP" {
				v.add(pf+".protocol", fmt.Sprintf("%q is not supported", cp.Protocol), "use TCP or UDP")
			}
			if cp.Name != "" {
				if errs := validation.IsValidPortName(cp.Name); len(errs) > 0 {
					v.add(pf+".name", fmt.Sprintf("%q is not a valid port name: %s", cp.Name, strings.Join(errs, "; ")), "")
				}
				if portNames[cp.Name] {
					v.add(pf+".name", fmt.Sprintf("duplicate port name %q", cp.Name), "")
				}
				portNames[cp.Name] = true
			}
			k := fmt.Sprintf("%d/%s", cp.ContainerPort, cp.Protocol)
			if portNums[k] {
				v.add(pf+".containerPort", fmt.Sprintf("duplicate port %s", k), "")
			}
			portNums[k] = true
		}
		if p.ProbePort != "" && !portNames[p.ProbePort] && !portNums[p.ProbePort+"/TCP"] {
			v.add(f+".probePort", fmt.Sprintf("%q is not a declared TCP port's name or number", p.ProbePort), "name one of the pod's ports")
		}
	}

	svcKeys := map[string]int{}
	for i := range s.Services {
		svc := &s.Services[i]
		f := fmt.Sprintf("services[%d]", i)
		if errs := validation.IsDNS1035Label(svc.Name); len(errs) > 0 {
			v.add(f+".name", fmt.Sprintf("%q is not a valid service name: %s", svc.Name, strings.Join(errs, "; ")), "start with a letter; use lower-case letters, digits and '-'")
		}
		if !nsKnown(svc.Namespace) {
			v.add(f+".namespace", fmt.Sprintf("namespace %q is not declared", svc.Namespace), "add it under namespaces:, or use one of: "+declared())
		}
		if j, dup := svcKeys[svc.Key()]; dup {
			v.add(f+".name", fmt.Sprintf("duplicate service %s (also services[%d])", svc.Key(), j), "")
		} else {
			svcKeys[svc.Key()] = i
		}
		v.labels(f+".labels", svc.Labels)
		v.labels(f+".selector", svc.Selector)
		var selected []*Pod
		for j := range s.Pods {
			if svc.Selects(&s.Pods[j]) {
				selected = append(selected, &s.Pods[j])
			}
		}
		if len(svc.Selector) == 0 {
			v.add(f+".selector", "no selector", "select the service's pods by label, e.g. selector: {app: web}")
		} else if len(selected) == 0 {
			v.add(f+".selector", fmt.Sprintf("selects no pod in namespace %q", svc.Namespace), "match the labels of at least one pod in the same namespace")
		}
		if len(svc.Ports) == 0 {
			v.add(f+".ports", "no ports", "add at least one port, e.g. ports: [{port: 80, targetPort: 8080}]")
		}
		names := map[string]bool{}
		nums := map[string]bool{}
		for j := range svc.Ports {
			sp := &svc.Ports[j]
			pf := fmt.Sprintf("%s.ports[%d]", f, j)
			if sp.Port < 1 || sp.Port > 65535 {
				v.add(pf+".port", fmt.Sprintf("%d is not a port number", sp.Port), "use 1-65535")
			}
			if sp.Protocol != "TCP" && sp.Protocol != "UDP" {
				v.add(pf+".protocol", fmt.Sprintf("%q is not supported", sp.Protocol), "use TCP or UDP")
			}
			if len(svc.Ports) > 1 && sp.Name == "" {
				v.add(pf+".name", "a service with several ports must name each", "add name:")
			}
			if sp.Name != "" {
				if errs := validation.IsDNS1123Label(sp.Name); len(errs) > 0 {
					v.add(pf+".name", fmt.Sprintf("%q is not a valid port name: %s", sp.Name, strings.Join(errs, "; ")), "")
				}
				if names[sp.Name] {
					v.add(pf+".name", fmt.Sprintf("duplicate port name %q", sp.Name), "")
				}
				names[sp.Name] = true
			}
			k := fmt.Sprintf("%d/%s", sp.Port, sp.Protocol)
			if nums[k] {
				v.add(pf+".port", "duplicate port "+k, "")
			}
			nums[k] = true
			switch sp.TargetPort.Type {
			case intstr.Int:
				if sp.TargetPort.IntVal < 1 || sp.TargetPort.IntVal > 65535 {
					v.add(pf+".targetPort", fmt.Sprintf("%d is not a port number", sp.TargetPort.IntVal), "use 1-65535 or a containerPort name")
				}
			case intstr.String:
				if errs := validation.IsValidPortName(sp.TargetPort.StrVal); len(errs) > 0 {
					v.add(pf+".targetPort", fmt.Sprintf("%q is neither a port number nor a valid port name: %s", sp.TargetPort.StrVal, strings.Join(errs, "; ")), "")
					continue
				}
				resolved := false
				for _, p := range selected {
					if _, ok := sp.ResolvePort(p); ok {
						resolved = true
						break
					}
				}
				if len(selected) > 0 && !resolved {
					v.add(pf+".targetPort", fmt.Sprintf("no selected pod declares a %s containerPort named %q", sp.Protocol, sp.TargetPort.StrVal), "add it to the pods' ports:, or use a number")
				}
			}
		}
	}
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v |= (1 << (32 - p.Bits())) - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
