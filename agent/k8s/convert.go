// Package k8s feeds the agent's cluster state (agent/state) from Kubernetes:
// client-go informers against an API server (Informers), or the same
// Kubernetes YAML read from a directory (Static) on machines without one.
//
// Pods are watched cluster-wide, because a connection's peer can be any pod;
// the informer cache keeps each pod in the state's form (CompactPod), shared
// with the store, which cuts its memory per pod several-fold. When the API server goes away
// the informers keep their caches and the store keeps its last snapshot:
// decisions go on with the last known state until the watch comes back.
package k8s

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nodemesh/nodemesh/agent/state"
)

// parseIPs parses the API's IP strings, skipping empty ones and reporting
// the first bad one.
func parseIPs(ss ...string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range ss {
		if s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("parsing IP %q: %w", s, err)
		}
		a = a.Unmap()
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out, nil
}

func port16(p int32) (uint16, bool) {
	if p <= 0 || p > 65535 {
		return 0, false
	}
	return uint16(p), true
}

func keepAnnotations(in map[string]string) map[string]string {
	var out map[string]string
	for k, v := range in {
		if state.KeepAnnotation(k) {
			if out == nil {
				out = make(map[string]string)
			}
			out[k] = v
		}
	}
	return out
}

// ConvertPod turns an API pod into the state's form. A pod whose IPs do not
// parse is an error: indexing it under a wrong address would misattribute
// identities.
func ConvertPod(p *corev1.Pod) (*state.Pod, error) {
	ipStrs := []string{p.Status.PodIP}
	for _, ip := range p.Status.PodIPs {
		ipStrs = append(ipStrs, ip.IP)
	}
	ips, err := parseIPs(ipStrs...)
	if err != nil {
		return nil, fmt.Errorf("converting pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	out := &state.Pod{
		Namespace:      p.Namespace,
		Name:           p.Name,
		ServiceAccount: p.Spec.ServiceAccountName,
		Node:           p.Spec.NodeName,
		Labels:         p.Labels,
		IPs:            ips,
		Phase:          state.PodPhase(p.Status.Phase),
		HostNetwork:    p.Spec.HostNetwork,
		Terminating:    p.DeletionTimestamp != nil,
		Workload:       workloadName(p),
	}
	out.SetDetail(state.PodDetail{UID: string(p.UID), Annotations: keepAnnotations(p.Annotations)})
	named := make(map[string]uint16)
	serving := servingContainers(&p.Spec)
	for _, c := range serving {
		for _, cp := range c.Ports {
			n, ok := port16(cp.ContainerPort)
			if !ok {
				continue
			}
			proto := string(cp.Protocol)
			if proto == "" {
				proto = "TCP"
			}
			out.Ports = append(out.Ports, state.ContainerPort{Name: cp.Name, Port: n, Protocol: proto})
			if _, dup := named[cp.Name]; cp.Name != "" && !dup {
				named[cp.Name] = n
			}
		}
	}
	for _, c := range serving {
		for _, pr := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
			if n, ok := probePort(pr, named); ok && !slices.Contains(out.ProbePorts, n) {
				out.ProbePorts = append(out.ProbePorts, n)
			}
		}
	}
	slices.Sort(out.ProbePorts)
	return out, nil
}

// servingContainers are the containers whose ports a pod serves on while
// it runs: its containers, then its sidecars (init containers with
// restartPolicy: Always, which keep running beside them). Kubernetes
// resolves a named port against the same list, in the same order
// (podutil.FindPort, used for Services' target ports; NetworkPolicy
// implementations follow it); an ordinary init container has exited
// before the pod serves, so its ports do not count. The first container
// that declares a name wins.
func servingContainers(spec *corev1.PodSpec) []corev1.Container {
	out := spec.Containers
	for _, c := range spec.InitContainers {
		if isSidecar(c) {
			out = append(slices.Clip(out), c)
		}
	}
	return out
}

func isSidecar(c corev1.Container) bool {
	return c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
}

// workloadName derives the controller name the way Istio does for its
// workload labels: a ReplicaSet's pod belongs to the Deployment whose name
// is the ReplicaSet's minus its "-<pod-template-hash>" suffix.
func workloadName(p *corev1.Pod) string {
	for _, o := range p.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		switch o.Kind {
		case "ReplicaSet":
			if h := p.Labels["pod-template-hash"]; h != "" && strings.HasSuffix(o.Name, "-"+h) {
				return strings.TrimSuffix(o.Name, "-"+h)
			}
			return o.Name
		case "Job":
			if cj, ok := strings.CutSuffix(o.Name, "-"+lastDash(o.Name)); ok && isDigits(lastDash(o.Name)) {
				return cj // a CronJob's Job: <cronjob>-<scheduled time>
			}
			return o.Name
		default:
			return o.Name
		}
	}
	return ""
}

func lastDash(s string) string {
	if i := strings.LastIndexByte(s, '-'); i >= 0 {
		return s[i+1:]
	}
	return ""
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

func probePort(pr *corev1.Probe, named map[string]uint16) (uint16, bool) {
	if pr == nil {
		return 0, false
	}
	var ip intstr.IntOrString
	switch {
	case pr.HTTPGet != nil:
		ip = pr.HTTPGet.Port
	case pr.TCPSocket != nil:
		ip = pr.TCPSocket.Port
	case pr.GRPC != nil:
		return port16(pr.GRPC.Port)
	default:
		return 0, false
	}
	if ip.Type == intstr.String {
		n, ok := named[ip.StrVal]
		return n, ok
	}
	return port16(ip.IntVal)
}

// ConvertNamespace turns an API namespace into the state's form.
func ConvertNamespace(n *corev1.Namespace) *state.Namespace {
	return &state.Namespace{Name: n.Name, Labels: n.Labels}
}

// ConvertNode turns an API node into the state's form (its internal and
// external addresses).
func ConvertNode(n *corev1.Node) (*state.Node, error) {
	var ss []string
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP || a.Type == corev1.NodeExternalIP {
			ss = append(ss, a.Address)
		}
	}
	ips, err := parseIPs(ss...)
	if err != nil {
		return nil, fmt.Errorf("converting node %s: %w", n.Name, err)
	}
	return &state.Node{Name: n.Name, IPs: ips}, nil
}

// ConvertService turns an API service into the state's form. Headless
// services ("None") get no ClusterIPs; ExternalName services have none either.
func ConvertService(s *corev1.Service) (*state.Service, error) {
	out := &state.Service{Namespace: s.Namespace, Name: s.Name, Labels: s.Labels}
	ips := s.Spec.ClusterIPs
	if len(ips) == 0 && s.Spec.ClusterIP != "" {
		ips = []string{s.Spec.ClusterIP}
	}
	if s.Spec.Type != corev1.ServiceTypeExternalName {
		for _, ip := range ips {
			if ip == corev1.ClusterIPNone || ip == "" {
				continue
			}
			a, err := netip.ParseAddr(ip)
			if err != nil {
				return nil, fmt.Errorf("converting service %s/%s: parsing ClusterIP %q: %w", s.Namespace, s.Name, ip, err)
			}
			out.ClusterIPs = append(out.ClusterIPs, a.Unmap())
		}
	}
	for _, p := range s.Spec.Ports {
		n, ok := port16(p.Port)
		if !ok {
			return nil, fmt.Errorf("converting service %s/%s: port %d out of range", s.Namespace, s.Name, p.Port)
		}
		sp := state.ServicePort{Name: p.Name, Protocol: string(p.Protocol), Port: n}
		if p.AppProtocol != nil {
			sp.AppProtocol = *p.AppProtocol
		}
		if sp.Protocol == "" {
			sp.Protocol = "TCP"
		}
		switch {
		case p.TargetPort.Type == intstr.String && p.TargetPort.StrVal != "":
			sp.TargetPortName = p.TargetPort.StrVal
		case p.TargetPort.Type == intstr.Int && p.TargetPort.IntVal != 0:
			t, ok := port16(p.TargetPort.IntVal)
			if !ok {
				return nil, fmt.Errorf("converting service %s/%s: targetPort %d out of range", s.Namespace, s.Name, p.TargetPort.IntVal)
			}
			sp.TargetPort = t
		default:
			sp.TargetPort = n // the API's default: targetPort = port
		}
		out.Ports = append(out.Ports, sp)
	}
	return out, nil
}

// ConvertEndpointSlice turns an API EndpointSlice into the state's form,
// resolving the optional conditions as the API defines them: a missing
// ready means ready, a missing serving means the same as ready, a missing
// terminating means not terminating.
func ConvertEndpointSlice(es *discoveryv1.EndpointSlice) (*state.EndpointSlice, error) {
	out := &state.EndpointSlice{
		Namespace:   es.Namespace,
		Name:        es.Name,
		Service:     es.Labels[state.LabelServiceName],
		AddressType: string(es.AddressType),
	}
	for _, p := range es.Ports {
		if p.Port == nil {
			continue // "all ports", only meaningful for headless selectorless services
		}
		n, ok := port16(*p.Port)
		if !ok {
			return nil, fmt.Errorf("converting EndpointSlice %s/%s: port %d out of range", es.Namespace, es.Name, *p.Port)
		}
		ep := state.EndpointPort{Port: n, Protocol: "TCP"}
		if p.Name != nil {
			ep.Name = *p.Name
		}
		if p.Protocol != nil {
			ep.Protocol = string(*p.Protocol)
		}
		out.Ports = append(out.Ports, ep)
	}
	if es.AddressType == discoveryv1.AddressTypeFQDN {
		return out, nil // host names, not addresses: nothing to index
	}
	for _, e := range es.Endpoints {
		addrs, err := parseIPs(e.Addresses...)
		if err != nil {
			return nil, fmt.Errorf("converting EndpointSlice %s/%s: %w", es.Namespace, es.Name, err)
		}
		ready := e.Conditions.Ready == nil || *e.Conditions.Ready
		serving := ready
		if e.Conditions.Serving != nil {
			serving = *e.Conditions.Serving
		}
		se := state.Endpoint{
			Addresses:   addrs,
			Ready:       ready,
			Serving:     serving,
			Terminating: e.Conditions.Terminating != nil && *e.Conditions.Terminating,
		}
		if e.NodeName != nil {
			se.Node = *e.NodeName
		}
		if r := e.TargetRef; r != nil && r.Kind == "Pod" {
			ns := r.Namespace
			if ns == "" {
				ns = es.Namespace
			}
			se.Pod = &state.Key{Namespace: ns, Name: r.Name}
		}
		out.Endpoints = append(out.Endpoints, se)
	}
	return out, nil
}

// ConvertObject turns an unstructured custom object into the state's form.
func ConvertObject(u *unstructured.Unstructured) *state.Object {
	gvk := u.GroupVersionKind()
	return &state.Object{
		GroupKind:  state.GroupKind{Group: gvk.Group, Kind: gvk.Kind},
		APIVersion: u.GetAPIVersion(),
		Namespace:  u.GetNamespace(),
		Name:       u.GetName(),
		Generation: u.GetGeneration(),
		Content:    u.Object,
	}
}
