package policy

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// NamespaceFromK8s converts a core/v1 Namespace.
func NamespaceFromK8s(ns *corev1.Namespace) Namespace {
	return Namespace{Name: ns.Name, Labels: cloneMap(ns.Labels)}
}

// NodeFromK8s converts a core/v1 Node, keeping its InternalIP and ExternalIP addresses.
func NodeFromK8s(n *corev1.Node) Node {
	out := Node{Name: n.Name}
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			out.IPs = append(out.IPs, ip.Unmap())
		}
	}
	return out
}

// PodFromK8s converts a core/v1 Pod: labels, IPs (status.podIPs, else
// status.podIP), service account, node, named container ports and the ports
// its probes target. Unparseable IPs are skipped.
func PodFromK8s(p *corev1.Pod) Pod {
	out := Pod{
		Namespace:      p.Namespace,
		Name:           p.Name,
		Labels:         cloneMap(p.Labels),
		ServiceAccount: p.Spec.ServiceAccountName,
		Node:           p.Spec.NodeName,
		HostNetwork:    p.Spec.HostNetwork,
	}
	if out.ServiceAccount == "" {
		out.ServiceAccount = "default"
	}
	seen := map[netip.Addr]bool{}
	addIP := func(s string) {
		if ip, err := netip.ParseAddr(s); err == nil && !seen[ip.Unmap()] {
			seen[ip.Unmap()] = true
			out.IPs = append(out.IPs, ip.Unmap())
		}
	}
	for _, ip := range p.Status.PodIPs {
		addIP(ip.IP)
	}
	addIP(p.Status.PodIP)

	containers := make([]corev1.Container, 0, len(p.Spec.InitContainers)+len(p.Spec.Containers))
	containers = append(containers, p.Spec.InitContainers...)
	containers = append(containers, p.Spec.Containers...)
	probePorts := map[int32]bool{}
	for _, c := range containers {
		for _, cp := range c.Ports {
			out.Ports = append(out.Ports, ContainerPort{Name: cp.Name, Port: cp.ContainerPort, Protocol: protoOrTCP(cp.Protocol)})
		}
		for _, pr := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
			if pr == nil {
				continue
			}
			var port *intstr.IntOrString
			switch {
			case pr.HTTPGet != nil:
				port = &pr.HTTPGet.Port
			case pr.TCPSocket != nil:
				port = &pr.TCPSocket.Port
			case pr.GRPC != nil:
				v := intstr.FromInt32(pr.GRPC.Port)
				port = &v
			}
			if port == nil {
				continue
			}
			if n := resolveContainerPort(c, *port); n > 0 {
				probePorts[n] = true
			}
		}
	}
	for n := range probePorts {
		out.ProbePorts = append(out.ProbePorts, n)
	}
	sortInt32(out.ProbePorts)
	return out
}

// resolveContainerPort resolves a probe port (number or name of one of the
// container's ports); 0 if it cannot be resolved.
func resolveContainerPort(c corev1.Container, p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		if p.IntVal > 0 && p.IntVal <= 65535 {
			return p.IntVal
		}
		return 0
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	return 0
}

func sortInt32(s []int32) { slices.Sort(s) }
