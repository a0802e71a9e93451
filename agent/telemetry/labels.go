package telemetry

import (
	"net/netip"
	"sync"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Defaults of Config.ClusterDomain and Config.ClusterID: Kubernetes' default
// DNS domain and Istio's default cluster ID, so that nodemesh's series line
// up with an Istio installation's out of the box.
const (
	DefaultClusterDomain = "cluster.local"
	DefaultClusterID     = "Kubernetes"
)

// Pod labels Istio derives the canonical service and revision from, in
// order of preference.
var (
	canonicalNameLabels     = []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"}
	canonicalRevisionLabels = []string{"service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"}
)

// Canonical returns a workload's canonical service and revision as Istio
// derives them: the first of canonicalNameLabels present (else the
// workload's name) and the first of canonicalRevisionLabels present (else
// "latest"). A label present with an empty value counts, as in Istio.
func Canonical(labels map[string]string, workload string) (service, revision string) {
	service, revision = workload, "latest"
	for _, k := range canonicalNameLabels {
		if v, ok := labels[k]; ok {
			service = v
			break
		}
	}
	for _, k := range canonicalRevisionLabels {
		if v, ok := labels[k]; ok {
			revision = v
			break
		}
	}
	return service, revision
}

// ServiceFQDN returns a Service's host name, name.namespace.svc.<domain>,
// Istio's destination_service.
func ServiceFQDN(name, namespace, domain string) string {
	return name + "." + namespace + ".svc." + domain
}

// peer describes a pod for Istio's labels; principal is the identity the
// connection proved or requires ("" when none).
func (o *Observer) peer(p *state.Pod, principal string) admin.Peer {
	svc, rev := Canonical(p.Labels, p.WorkloadName())
	return admin.Peer{Workload: p.WorkloadName(), Namespace: p.Namespace, Principal: principal,
		CanonicalService: svc, CanonicalRevision: rev, Cluster: o.cfg.ClusterID}
}

// inboundServices guesses the Service an inbound connection was meant for,
// as ztunnel does: the destination's HBONE request names the pod, not the
// Service, so the Service is one whose endpoints include the pod's
// address and port (the first by namespace/name when several do). The
// index is rebuilt at most once per state version, on the first inbound
// connection after a change.
type inboundServices struct {
	mu      sync.Mutex
	version uint64
	built   bool
	byAddr  map[netip.AddrPort]state.Key
}

func (s *inboundServices) lookup(snap *state.Snapshot, dst netip.AddrPort) (state.Key, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.built || s.version != snap.Version() {
		s.byAddr = make(map[netip.AddrPort]state.Key)
		for _, svc := range snap.Services() {
			for _, port := range svc.Ports {
				for _, b := range snap.Backends(svc, port) {
					if _, dup := s.byAddr[b.Addr]; !dup {
						s.byAddr[b.Addr] = svc.Key()
					}
				}
			}
		}
		s.version, s.built = snap.Version(), true
	}
	k, ok := s.byAddr[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
	return k, ok
}
