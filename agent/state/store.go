package state

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Store holds the current cluster state. Sources write into it with Update;
// readers take a Snapshot. The first Snapshot after a change pays for
// re-indexing (linear in the cluster size); every later one is a pointer
// load, so the connection path never waits for the indexer when nothing
// changed.
//
// A Store is safe for concurrent use.
type Store struct {
	td spiffeid.TrustDomain

	mu      sync.Mutex
	in      inputs
	version uint64
	synced  bool
	subs    map[chan struct{}]struct{}
	pods    map[Key]computed // see build

	cur atomic.Pointer[Snapshot] // nil while a change is not yet indexed
}

type inputs struct {
	namespaces map[string]*Namespace
	nodes      map[string]*Node
	pods       map[Key]*Pod
	services   map[Key]*Service
	slices     map[Key]*EndpointSlice
	netpols    map[Key]*NetworkPolicy
	objects    map[GroupKind]map[Key]*Object
}

func (in *inputs) reset() {
	in.namespaces = make(map[string]*Namespace)
	in.nodes = make(map[string]*Node)
	in.pods = make(map[Key]*Pod)
	in.services = make(map[Key]*Service)
	in.slices = make(map[Key]*EndpointSlice)
	in.netpols = make(map[Key]*NetworkPolicy)
	in.objects = make(map[GroupKind]map[Key]*Object)
}

// NewStore returns an empty, unsynced store whose pods get identities in td.
func NewStore(td spiffeid.TrustDomain) (*Store, error) {
	if td.IsZero() {
		return nil, fmt.Errorf("creating state store: empty trust domain")
	}
	s := &Store{td: td, subs: make(map[chan struct{}]struct{}), pods: make(map[Key]computed)}
	s.in.reset()
	return s, nil
}

// Snapshot returns the current state. It never returns nil.
func (s *Store) Snapshot() *Snapshot {
	if snap := s.cur.Load(); snap != nil {
		return snap
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if snap := s.cur.Load(); snap != nil {
		return snap
	}
	snap := build(&s.in, s.version, s.synced, s.td, s.pods)
	s.cur.Store(snap)
	return snap
}

// Version is the version the next Snapshot will have.
func (s *Store) Version() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.version
}

// Update applies fn's changes as one new version. Values passed to the Tx
// belong to the store afterwards and must not be modified by the caller.
// Subscribers are told when fn changed anything.
func (s *Store) Update(fn func(tx *Tx)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	tx := &Tx{in: &s.in}
	fn(tx)
	tx.in = nil
	if tx.changed {
		s.changedLocked()
	}
}

// MarkSynced records that the sources delivered their initial state. Until
// then snapshots report Synced false and the agent is not ready.
func (s *Store) MarkSynced() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.synced {
		s.synced = true
		s.changedLocked()
	}
}

func (s *Store) changedLocked() {
	s.version++
	s.cur.Store(nil)
	for ch := range s.subs {
		select {
		case ch <- struct{}{}:
		default: // a notification is already pending; changes coalesce
		}
	}
}

// Subscribe returns a channel that receives a value after changes (several
// changes may coalesce into one value; read Snapshot for the latest) and a
// function that ends the subscription.
func (s *Store) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	s.mu.Lock()
	s.subs[ch] = struct{}{}
	s.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			s.mu.Lock()
			delete(s.subs, ch)
			s.mu.Unlock()
		})
	}
}

// WaitFor blocks until a snapshot satisfies cond and returns it, or returns
// the context's error.
func (s *Store) WaitFor(ctx context.Context, cond func(*Snapshot) bool) (*Snapshot, error) {
	ch, cancel := s.Subscribe()
	defer cancel()
	for {
		snap := s.Snapshot()
		if cond(snap) {
			return snap, nil
		}
		select {
		case <-ctx.Done():
			return snap, fmt.Errorf("waiting for cluster state (at version %d, synced %t): %w", snap.Version(), snap.Synced(), context.Cause(ctx))
		case <-ch:
		}
	}
}

// Tx is a batch of changes inside Store.Update. It is only valid during the
// Update call.
type Tx struct {
	in      *inputs
	changed bool
}

// Reset removes everything, for a source that replaces the whole state.
func (tx *Tx) Reset() {
	tx.in.reset()
	tx.changed = true
}

// SetNamespace adds or replaces a namespace.
func (tx *Tx) SetNamespace(n *Namespace) {
	tx.in.namespaces[n.Name] = n
	tx.changed = true
}

// DeleteNamespace removes a namespace.
func (tx *Tx) DeleteNamespace(name string) {
	if _, ok := tx.in.namespaces[name]; ok {
		delete(tx.in.namespaces, name)
		tx.changed = true
	}
}

// SetNode adds or replaces a node.
func (tx *Tx) SetNode(n *Node) {
	tx.in.nodes[n.Name] = n
	tx.changed = true
}

// DeleteNode removes a node.
func (tx *Tx) DeleteNode(name string) {
	if _, ok := tx.in.nodes[name]; ok {
		delete(tx.in.nodes, name)
		tx.changed = true
	}
}

// SetPod adds or replaces a pod.
func (tx *Tx) SetPod(p *Pod) {
	tx.in.pods[p.Key()] = p
	tx.changed = true
}

// DeletePod removes a pod.
func (tx *Tx) DeletePod(k Key) { tx.changed = deleteKey(tx.in.pods, k) || tx.changed }

// SetService adds or replaces a service.
func (tx *Tx) SetService(svc *Service) {
	tx.in.services[svc.Key()] = svc
	tx.changed = true
}

// DeleteService removes a service.
func (tx *Tx) DeleteService(k Key) { tx.changed = deleteKey(tx.in.services, k) || tx.changed }

// SetEndpointSlice adds or replaces an EndpointSlice.
func (tx *Tx) SetEndpointSlice(es *EndpointSlice) {
	tx.in.slices[es.Key()] = es
	tx.changed = true
}

// DeleteEndpointSlice removes an EndpointSlice.
func (tx *Tx) DeleteEndpointSlice(k Key) { tx.changed = deleteKey(tx.in.slices, k) || tx.changed }

// SetNetworkPolicy adds or replaces a NetworkPolicy.
func (tx *Tx) SetNetworkPolicy(np *NetworkPolicy) {
	tx.in.netpols[Key{np.Namespace, np.Name}] = np
	tx.changed = true
}

// DeleteNetworkPolicy removes a NetworkPolicy.
func (tx *Tx) DeleteNetworkPolicy(k Key) { tx.changed = deleteKey(tx.in.netpols, k) || tx.changed }

// SetObject adds or replaces a custom object.
func (tx *Tx) SetObject(o *Object) {
	m := tx.in.objects[o.GroupKind]
	if m == nil {
		m = make(map[Key]*Object)
		tx.in.objects[o.GroupKind] = m
	}
	m[o.Key()] = o
	tx.changed = true
}

// DeleteObject removes a custom object.
func (tx *Tx) DeleteObject(gk GroupKind, k Key) {
	tx.changed = deleteKey(tx.in.objects[gk], k) || tx.changed
}

func deleteKey[V any](m map[Key]V, k Key) bool {
	if _, ok := m[k]; !ok {
		return false
	}
	delete(m, k)
	return true
}
