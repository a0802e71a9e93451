// Package state is the agent's view of the cluster: an indexed, versioned,
// immutable Snapshot of pods, namespaces, services, EndpointSlices,
// NetworkPolicies and nodemesh custom objects, kept current by a Store that
// sources (agent/k8s: informers or static files) write into.
//
// Every connection decision reads one Snapshot, so it sees a consistent
// cluster: a pod's enrollment, its identity and the endpoints of the service
// it dialled all come from the same version. Snapshots are never modified
// after they are published; everything reachable from one (maps, slices,
// pointers) is read-only for callers.
//
// The package holds plain values only and does not import client-go; the
// converters from Kubernetes API objects live in agent/k8s.
package state

import (
	"encoding/json"
	"net/netip"
	"strings"

	networkingv1 "k8s.io/api/networking/v1"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Labels and annotations the agent reads.
const (
	// LabelMode on a namespace ("enabled") enrolls its pods; on a pod
	// ("disabled") opts that pod out.
	LabelMode    = "nodemesh.io/mode"
	ModeEnabled  = "enabled"
	ModeDisabled = "disabled"

	// AnnotationExcludeInboundPorts and AnnotationExcludeOutboundPorts list
	// ports (comma separated) that capture leaves alone, like Istio's
	// traffic.sidecar.istio.io/exclude{In,Out}boundPorts.
	AnnotationExcludeInboundPorts  = "nodemesh.io/exclude-inbound-ports"
	AnnotationExcludeOutboundPorts = "nodemesh.io/exclude-outbound-ports"

	// AnnotationNetns and AnnotationCgroup are written by the lab (which plays
	// kubelet): the pod's network namespace path and its cgroup v2 path. A real
	// node discovers these from the container runtime instead.
	AnnotationNetns  = "lab.nodemesh.io/netns"
	AnnotationCgroup = "lab.nodemesh.io/cgroup"

	// LabelServiceName ties an EndpointSlice to its Service.
	LabelServiceName = "kubernetes.io/service-name"
)

// AnnotationPrefixes are the annotation key prefixes the agent keeps; sources
// drop every other annotation to save memory.
var AnnotationPrefixes = []string{"nodemesh.io/", "lab.nodemesh.io/"}

// KeepAnnotation reports whether the agent needs annotation key.
func KeepAnnotation(key string) bool {
	for _, p := range AnnotationPrefixes {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return false
}

// NodeLocalAnnotation reports whether only the agent of the pod's own node
// reads annotation key: the lab's netns and cgroup paths, which locate the
// pod on its node. Sources may drop them from pods of other nodes.
func NodeLocalAnnotation(key string) bool { return strings.HasPrefix(key, "lab.nodemesh.io/") }

// Key names a namespaced object.
type Key struct {
	Namespace, Name string
}

func (k Key) String() string {
	if k.Namespace == "" {
		return k.Name
	}
	return k.Namespace + "/" + k.Name
}

// Namespace is a Kubernetes namespace.
type Namespace struct {
	Name   string
	Labels map[string]string
	// Enrolled is computed by the snapshot: LabelMode is ModeEnabled.
	Enrolled bool
}

// Node is a cluster node and its addresses (the source of kubelet probes).
type Node struct {
	Name string       `json:"name"`
	IPs  []netip.Addr `json:"ips"`
}

// PodPhase mirrors corev1.PodPhase.
type PodPhase string

// Pod phases the snapshot treats specially.
const (
	PodPending   PodPhase = "Pending"
	PodRunning   PodPhase = "Running"
	PodSucceeded PodPhase = "Succeeded"
	PodFailed    PodPhase = "Failed"
)

// ContainerPort is a port a container declares.
type ContainerPort struct {
	Name     string `json:"name,omitempty"`
	Port     uint16 `json:"port"`
	Protocol string `json:"protocol"`
}

// Pod is what the agent knows about a pod. Sources fill the input fields;
// the snapshot fills the computed ones.
//
// The agent keeps one for every pod in the cluster, so its size is most of
// what a remote pod costs: what most pods leave empty or only the pod's
// own node reads (PodDetail) sits behind one pointer, read with UID,
// Annotations, ExcludeInboundPorts, ExcludeOutboundPorts, Netns, Cgroup and
// Problems and written with SetDetail, SetUID and SetAnnotations, which
// leave a copy's detail alone. That keeps the struct in the 240-byte size
// class instead of 384 (TestPodSize).
type Pod struct {
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	ServiceAccount string            `json:"serviceAccount"`
	Node           string            `json:"node"`
	Labels         map[string]string `json:"labels,omitempty"`
	IPs            []netip.Addr      `json:"ips"`
	Ports          []ContainerPort   `json:"ports,omitempty"`
	// ProbePorts are the TCP ports kubelet's HTTP, TCP and gRPC probes
	// target (named ports resolved), for policy's probe exemption.
	ProbePorts []uint16 `json:"probePorts,omitempty"`
	Phase      PodPhase `json:"phase"`
	// Workload is the name of the pod's controller as Istio reports it in
	// source_workload/destination_workload: the Deployment for a pod of a
	// ReplicaSet, the StatefulSet, DaemonSet or Job, else the pod's name.
	// Empty means the pod's name.
	Workload    string `json:"workload,omitempty"`
	HostNetwork bool   `json:"hostNetwork,omitempty"`
	// Terminating is set once the pod has a deletion timestamp.
	Terminating bool `json:"terminating,omitempty"`

	// Computed by the snapshot.

	// Enrolled: the namespace is enabled, the pod has not opted out, and it
	// is not on the host network.
	Enrolled bool `json:"enrolled"`
	// computed is set once the store has filled in the computed fields.
	// The store fills them into the value it was given, once, before any
	// snapshot holds it, so the informer cache and the snapshot share one
	// copy of each pod; after that the value is never written again.
	computed bool
	// Identity is spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
	Identity spiffeid.ID `json:"identity"`
	// Ref is "namespace/name", computed once so the connection path does
	// not build it per lookup.
	Ref string `json:"-"`

	// detail is nil when every field of it is empty. The value it points
	// to is never written once set: copies of a pod share it, and the
	// setters replace it.
	detail *PodDetail
}

// PodDetail is the part of a Pod that most pods leave empty, or that only
// the agent of the pod's own node reads (sources may drop that from pods
// of other nodes, see agent/k8s TransformFor).
type PodDetail struct {
	// UID is node-local detail: empty for a pod of another node when the
	// source drops that.
	UID string `json:"uid"`
	// Annotations holds only the keys KeepAnnotation accepts, without the
	// NodeLocalAnnotation ones for a pod of another node when the source
	// drops those.
	Annotations map[string]string `json:"annotations,omitempty"`

	// Computed by the snapshot.

	// ExcludeInboundPorts and ExcludeOutboundPorts come from the annotations.
	// An annotation that does not parse excludes nothing (fail closed: the
	// traffic stays in the mesh) and is reported in Problems.
	ExcludeInboundPorts  []uint16 `json:"excludeInboundPorts,omitempty"`
	ExcludeOutboundPorts []uint16 `json:"excludeOutboundPorts,omitempty"`
	// Netns and Cgroup are the lab annotations (paths), empty when absent.
	Netns  string `json:"netns,omitempty"`
	Cgroup string `json:"cgroup,omitempty"`
	// Problems lists input the snapshot could not use, for the config dump.
	Problems []string `json:"problems,omitempty"`
}

func (d *PodDetail) empty() bool {
	return d.UID == "" && len(d.Annotations) == 0 && len(d.ExcludeInboundPorts) == 0 && len(d.ExcludeOutboundPorts) == 0 &&
		d.Netns == "" && d.Cgroup == "" && len(d.Problems) == 0
}

// noDetail is what a pod without detail reads.
var noDetail PodDetail

func (p *Pod) d() *PodDetail {
	if p.detail == nil {
		return &noDetail
	}
	return p.detail
}

// Detail returns a copy of the pod's detail (its maps and slices shared,
// and as read-only as the pod's own).
func (p *Pod) Detail() PodDetail { return *p.d() }

// SetDetail replaces the pod's detail with a copy of d. Copies of the pod
// made before keep theirs.
func (p *Pod) SetDetail(d PodDetail) {
	if d.empty() {
		p.detail = nil
		return
	}
	p.detail = &d
}

// SetUID sets the pod's UID; copies of the pod made before keep theirs.
func (p *Pod) SetUID(uid string) {
	d := p.Detail()
	d.UID = uid
	p.SetDetail(d)
}

// SetAnnotations sets the pod's annotations (which the caller must not
// modify afterwards); copies of the pod made before keep theirs.
func (p *Pod) SetAnnotations(a map[string]string) {
	d := p.Detail()
	d.Annotations = a
	p.SetDetail(d)
}

// SetLocation sets the pod's netns and cgroup paths; copies of the pod
// made before keep theirs.
func (p *Pod) SetLocation(netns, cgroup string) {
	d := p.Detail()
	d.Netns, d.Cgroup = netns, cgroup
	p.SetDetail(d)
}

// UID returns the pod's UID (PodDetail.UID).
func (p *Pod) UID() string { return p.d().UID }

// Annotations returns the pod's kept annotations (PodDetail.Annotations).
func (p *Pod) Annotations() map[string]string { return p.d().Annotations }

// ExcludeInboundPorts returns PodDetail.ExcludeInboundPorts.
func (p *Pod) ExcludeInboundPorts() []uint16 { return p.d().ExcludeInboundPorts }

// ExcludeOutboundPorts returns PodDetail.ExcludeOutboundPorts.
func (p *Pod) ExcludeOutboundPorts() []uint16 { return p.d().ExcludeOutboundPorts }

// Netns returns the lab's netns path (PodDetail.Netns).
func (p *Pod) Netns() string { return p.d().Netns }

// Cgroup returns the lab's cgroup path (PodDetail.Cgroup).
func (p *Pod) Cgroup() string { return p.d().Cgroup }

// Problems returns PodDetail.Problems.
func (p *Pod) Problems() []string { return p.d().Problems }

// podJSON is a Pod's encoding: its fields and its detail's, flat, as
// before the detail moved behind a pointer.
type podJSON struct {
	*podFields
	*PodDetail
}

type podFields Pod // without Pod's methods

// MarshalJSON encodes the pod with its detail's fields beside its own.
func (p *Pod) MarshalJSON() ([]byte, error) {
	d := p.Detail()
	return json.Marshal(podJSON{(*podFields)(p), &d})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (p *Pod) UnmarshalJSON(b []byte) error {
	var d PodDetail
	var f podFields
	if err := json.Unmarshal(b, &podJSON{&f, &d}); err != nil {
		return err
	}
	*p = Pod(f)
	p.SetDetail(d)
	return nil
}

// Key returns the pod's namespace/name.
func (p *Pod) Key() Key { return Key{p.Namespace, p.Name} }

// WorkloadName returns Workload, or the pod's name when it is empty.
func (p *Pod) WorkloadName() string {
	if p.Workload != "" {
		return p.Workload
	}
	return p.Name
}

// Live reports whether the pod can still own its IPs: it has not finished.
func (p *Pod) Live() bool { return p.Phase != PodSucceeded && p.Phase != PodFailed }

// HasIP reports whether ip is one of the pod's IPs.
func (p *Pod) HasIP(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, a := range p.IPs {
		if a == ip {
			return true
		}
	}
	return false
}

// ServicePort is one port of a Service.
type ServicePort struct {
	Name     string `json:"name,omitempty"`
	Protocol string `json:"protocol"`
	Port     uint16 `json:"port"`
	// TargetPort is the numeric target port, 0 when the target is named.
	TargetPort uint16 `json:"targetPort,omitempty"`
	// TargetPortName is the named target port, "" when numeric.
	TargetPortName string `json:"targetPortName,omitempty"`
	// AppProtocol is the port's appProtocol ("" when unset); agent/l7
	// reads it for Services opted in to L7.
	AppProtocol string `json:"appProtocol,omitempty"`
}

// Service is a Kubernetes Service.
type Service struct {
	Namespace  string            `json:"namespace"`
	Name       string            `json:"name"`
	Labels     map[string]string `json:"labels,omitempty"`
	ClusterIPs []netip.Addr      `json:"clusterIPs,omitempty"` // empty for headless services
	Ports      []ServicePort     `json:"ports"`
}

// Key returns the service's namespace/name.
func (s *Service) Key() Key { return Key{s.Namespace, s.Name} }

// EndpointPort is a port of an EndpointSlice.
type EndpointPort struct {
	Name     string `json:"name,omitempty"`
	Protocol string `json:"protocol"`
	Port     uint16 `json:"port"`
}

// Endpoint is one endpoint of an EndpointSlice. Ready, Serving and
// Terminating are already resolved from the API's optional conditions (a
// missing ready condition means ready).
type Endpoint struct {
	Addresses   []netip.Addr `json:"addresses"`
	Ready       bool         `json:"ready"`
	Serving     bool         `json:"serving"`
	Terminating bool         `json:"terminating,omitempty"`
	Node        string       `json:"node,omitempty"`
	// Pod is the target pod, if the endpoint references one.
	Pod *Key `json:"pod,omitempty"`
}

// EndpointSlice is a discovery.k8s.io/v1 EndpointSlice.
type EndpointSlice struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Service is the kubernetes.io/service-name label.
	Service     string         `json:"service"`
	AddressType string         `json:"addressType"`
	Ports       []EndpointPort `json:"ports"`
	Endpoints   []Endpoint     `json:"endpoints"`
}

// Key returns the slice's namespace/name.
func (e *EndpointSlice) Key() Key { return Key{e.Namespace, e.Name} }

// GroupKind names the kind of a custom object, e.g. {"security.nodemesh.io",
// "AuthorizationPolicy"}.
type GroupKind struct {
	Group, Kind string
}

func (g GroupKind) String() string { return g.Kind + "." + g.Group }

// Object is a custom resource carried as unstructured content (the decoded
// JSON of the whole object). Consumers convert it to their typed form.
type Object struct {
	GroupKind  GroupKind      `json:"groupKind"`
	APIVersion string         `json:"apiVersion"`
	Namespace  string         `json:"namespace,omitempty"`
	Name       string         `json:"name"`
	Generation int64          `json:"generation,omitempty"`
	Content    map[string]any `json:"content"`
}

// Key returns the object's namespace/name.
func (o *Object) Key() Key { return Key{o.Namespace, o.Name} }

// NetworkPolicy is carried as the Kubernetes API type: the policy engine
// converts it to its own input, and keeping the original preserves every
// field of NetworkPolicy's exact meaning.
type NetworkPolicy = networkingv1.NetworkPolicy

// WithDetail returns a copy of p with detail d, for building pods in
// tests and static sources.
func WithDetail(p Pod, d PodDetail) *Pod {
	p.SetDetail(d)
	return &p
}
