// Package spec defines the lab's YAML spec (nodes, namespaces, pods and
// services of a cluster built on one machine), parses it strictly and
// validates it before anything is created.
//
// Parse never panics on bad input: every problem comes back as an *Error
// that names the file, the field and what to fix. Defaults (node IPs, pod
// CIDRs, service account "default", protocol TCP, targetPort = port) are
// filled in by Parse so that the rest of the lab works on complete values.
package spec

import (
	"k8s.io/apimachinery/pkg/util/intstr"
)

// APIVersion and Kind identify a lab spec document.
const (
	APIVersion = "lab.nodemesh.io/v1alpha1"
	Kind       = "Lab"
)

// Default address plan. The underlay is the bridge every node is attached
// to; node pod CIDRs are carved as /24s out of DefaultClusterCIDR. Nothing
// of it is routed from or to the host: the bridge has no address in the
// root network namespace.
const (
	DefaultUnderlay    = "10.250.0.0/24"
	DefaultClusterCIDR = "10.244.0.0/16"
	// DefaultServiceCIDR is the range the lab's API server allocates
	// ClusterIPs from; pod and node addresses must not overlap it.
	DefaultServiceCIDR = "10.96.0.0/16"
	DefaultNamespace   = "default"
	DefaultSA          = "default"
)

// Spec is a whole lab: the machines, the Kubernetes namespaces, the pods
// the lab runs as kubelet would, and the services it programs as
// kube-proxy and the EndpointSlice controller would.
type Spec struct {
	APIVersion string      `json:"apiVersion,omitempty"`
	Kind       string      `json:"kind,omitempty"`
	Network    Network     `json:"network,omitempty"`
	Nodes      []Node      `json:"nodes"`
	Namespaces []Namespace `json:"namespaces,omitempty"`
	Pods       []Pod       `json:"pods,omitempty"`
	Services   []Service   `json:"services,omitempty"`
}

// Network is the lab's address plan.
type Network struct {
	// Underlay is the IPv4 prefix of the shared bridge the nodes sit on.
	Underlay string `json:"underlay,omitempty"`
	// ClusterCIDR is the range node pod CIDRs are taken from when a node
	// does not name its own.
	ClusterCIDR string `json:"clusterCIDR,omitempty"`
	// ServiceCIDR must match the API server's service range; it is only
	// used to refuse pod and node addresses that overlap it.
	ServiceCIDR string `json:"serviceCIDR,omitempty"`
	// IPv6 makes the lab dual-stack: nodes and pods keep IPv6 on, every
	// pod gets a global address (its IPv4 address embedded in
	// fd4e:4d:0:1::/96, listed second in status.podIPs) besides its
	// link-local one, nodes route pods' IPv6 ranges over the underlay, and
	// pods' default IPv6 gateway is fe80::1 on their veth. Services stay
	// IPv4. Off by default: IPv6 is then switched off in every lab
	// namespace.
	IPv6 bool `json:"ipv6,omitempty"`
}

// Node is one machine of the lab: a network namespace on the underlay.
type Node struct {
	Name string `json:"name"`
	// IP on the underlay; default: the (index+2)th address of the underlay.
	IP string `json:"ip,omitempty"`
	// PodCIDR is the node's pod range; default: 10.244.<index+1>.0/24 of
	// the cluster CIDR.
	PodCIDR string            `json:"podCIDR,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
}

// Namespace is a Kubernetes namespace.
type Namespace struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Pod is a process tree in its own network namespace and cgroup on a node,
// published to the API server as a running Pod.
type Pod struct {
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace,omitempty"`
	Node           string            `json:"node"`
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	Annotations    map[string]string `json:"annotations,omitempty"`
	// Command is the argv run in the pod. An argv[0] of "nodemeshctl" runs
	// the lab's built-in workloads (nodemeshctl lab workload ...) without
	// needing the binary on PATH.
	Command []string        `json:"command"`
	Ports   []ContainerPort `json:"ports,omitempty"`
	// ProbePort, a declared port's name or number, gets a TCP readiness
	// probe in the Pod object, as kubelet would run one: the agents then
	// exempt plaintext from the pod's node to that port from STRICT mTLS.
	// (The lab does not run the probe; it marks pods ready itself.)
	ProbePort string `json:"probePort,omitempty"`
}

// ContainerPort names a port the pod's command listens on.
type ContainerPort struct {
	Name          string `json:"name,omitempty"`
	ContainerPort int32  `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"`
}

// Service is a ClusterIP service.
type Service struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	Selector  map[string]string `json:"selector"`
	Ports     []ServicePort     `json:"ports"`
}

// ServicePort is one port of a service.
type ServicePort struct {
	Name     string `json:"name,omitempty"`
	Port     int32  `json:"port"`
	Protocol string `json:"protocol,omitempty"`
	// TargetPort is a number or the name of a pod's containerPort;
	// default: Port.
	TargetPort intstr.IntOrString `json:"targetPort,omitempty"`
}

// Key returns "namespace/name".
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// Key returns "namespace/name".
func (s *Service) Key() string { return s.Namespace + "/" + s.Name }

// Selects reports whether the service's selector matches the pod.
func (s *Service) Selects(p *Pod) bool {
	if p.Namespace != s.Namespace || len(s.Selector) == 0 {
		return false
	}
	for k, v := range s.Selector {
		if pv, ok := p.Labels[k]; !ok || pv != v {
			return false
		}
	}
	return true
}

// ResolvePort returns the pod port a service port targets, or false when a
// named targetPort is not declared by the pod (Kubernetes then leaves the
// pod out of that port's endpoints).
func (sp *ServicePort) ResolvePort(p *Pod) (int32, bool) {
	if sp.TargetPort.Type == intstr.Int {
		return sp.TargetPort.IntVal, true
	}
	for _, cp := range p.Ports {
		if cp.Name == sp.TargetPort.StrVal && cp.Protocol == sp.Protocol {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

// Node returns the named node.
func (s *Spec) Node(name string) (*Node, bool) {
	for i := range s.Nodes {
		if s.Nodes[i].Name == name {
			return &s.Nodes[i], true
		}
	}
	return nil, false
}

// Pod returns the pod with key "namespace/name".
func (s *Spec) Pod(key string) (*Pod, bool) {
	for i := range s.Pods {
		if s.Pods[i].Key() == key {
			return &s.Pods[i], true
		}
	}
	return nil, false
}

// Namespace returns the named namespace.
func (s *Spec) Namespace(name string) (*Namespace, bool) {
	for i := range s.Namespaces {
		if s.Namespaces[i].Name == name {
			return &s.Namespaces[i], true
		}
	}
	return nil, false
}
