package telemetry

import (
	"net/netip"
	"slices"
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
// address and port (the first by namespace/name when several do).
//
// The index of backends is built on the first inbound connection (an
// agent that never serves one never holds it), then kept incrementally:
// each newer state snapshot (Refresh, which the agent calls on every state
// change, off the connection path; or a lookup with a snapshot the index
// is not at) updates only the addresses of the Services whose backends
// changed (state.Snapshot.ChangesSince). It used to be rebuilt from every
// Service on the first connection after each state change, which under
// churn at 100,000 pods was nearly every connection.
type inboundServices struct {
	mu   sync.Mutex
	prev *state.Snapshot // the snapshot the index is at; nil until built
	// owner is the first Service by namespace/name with a backend at an
	// address; claims lists every such Service, sorted, where there are
	// several.
	owner  map[netip.AddrPort]state.Key
	claims map[netip.AddrPort][]state.Key
}

func (s *inboundServices) lookup(snap *state.Snapshot, dst netip.AddrPort) (state.Key, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.updateLocked(snap, true)
	k, ok := s.owner[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
	return k, ok
}

// refresh brings a built index to snap when snap is newer.
func (s *inboundServices) refresh(snap *state.Snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.updateLocked(snap, false)
}

// updateLocked brings the index to snap (building it if build is set and
// it is not built yet). It never goes back: a connection that read the
// state just before the agent's Refresh gets the newer answer.
func (s *inboundServices) updateLocked(snap *state.Snapshot, build bool) {
	if s.prev == nil && !build || s.prev != nil && snap.Version() <= s.prev.Version() {
		return
	}
	if s.prev == nil {
		s.owner = make(map[netip.AddrPort]state.Key)
		s.claims = make(map[netip.AddrPort][]state.Key)
		for svc := range snap.AllServices() {
			s.service(nil, snap, svc.Key())
		}
	} else {
		for _, k := range snap.ChangesSince(s.prev).Backends {
			s.service(s.prev, snap, k)
		}
	}
	s.prev = snap
}

// service moves Service k's backends from what they were in old (nil:
// none) to what they are in snap.
func (s *inboundServices) service(old, snap *state.Snapshot, k state.Key) {
	was, is := backendAddrs(old, k), backendAddrs(snap, k)
	for ap := range was {
		if !is[ap] {
			s.release(ap, k)
		}
	}
	for ap := range is {
		if !was[ap] {
			s.claim(ap, k)
		}
	}
}

// backendAddrs returns the addresses of Service k's backends in snap.
func backendAddrs(snap *state.Snapshot, k state.Key) map[netip.AddrPort]bool {
	if snap == nil {
		return nil
	}
	svc := snap.Service(k.Namespace, k.Name)
	if svc == nil {
		return nil
	}
	var out map[netip.AddrPort]bool
	for _, port := range svc.Ports {
		for _, b := range snap.Backends(svc, port) {
			if out == nil {
				out = make(map[netip.AddrPort]bool)
			}
			out[b.Addr] = true
		}
	}
	return out
}

func (s *inboundServices) claim(ap netip.AddrPort, k state.Key) {
	cur, ok := s.owner[ap]
	if !ok {
		s.owner[ap] = k
		return
	}
	list := s.claims[ap]
	if list == nil {
		list = []state.Key{cur}
	}
	i, _ := slices.BinarySearchFunc(list, k, state.Key.Compare)
	list = slices.Insert(list, i, k)
	s.claims[ap], s.owner[ap] = list, list[0]
}

func (s *inboundServices) release(ap netip.AddrPort, k state.Key) {
	list, ok := s.claims[ap]
	if !ok {
		if s.owner[ap] == k {
			delete(s.owner, ap)
		}
		return
	}
	if i, found := slices.BinarySearchFunc(list, k, state.Key.Compare); found {
		list = slices.Delete(list, i, i+1)
	}
	s.owner[ap] = list[0]
	if len(list) == 1 {
		delete(s.claims, ap)
	} else {
		s.claims[ap] = list
	}
}
