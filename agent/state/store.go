package state

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/internal/pmap"
)

// Store holds the current cluster state. Sources write into it with Update;
// readers take a Snapshot. Changes are kept as pending until the next
// Snapshot, which applies them to the previous snapshot: a change to one
// object updates only the indexes it touches (copying the shards of the
// maps it changes, see pmap), so its cost does not grow with the cluster.
// Every later Snapshot is a pointer load, so the connection path never
// waits for the indexer when nothing changed.
//
// A Store is safe for concurrent use.
type Store struct {
	td spiffeid.TrustDomain

	mu      sync.Mutex
	version uint64
	synced  bool
	subs    map[chan struct{}]struct{}
	prev    *Snapshot // the last snapshot built; pend applies on top of it
	pend    pending
	idx     buildIndex // what incremental builds need beyond the snapshot

	cur atomic.Pointer[Snapshot] // nil while a change is not yet indexed
}

// pending holds the changes since the last build; a nil value is a
// deletion. After Reset, they apply to an empty state.
type pending struct {
	reset      bool
	namespaces map[string]*Namespace
	nodes      map[string]*Node
	pods       map[Key]*Pod
	services   map[Key]*Service
	slices     map[Key]*EndpointSlice
	netpols    map[Key]*NetworkPolicy
	objects    map[GroupKind]map[Key]*Object
}

func (p *pending) clear() {
	p.reset = false
	p.namespaces = pmap.Fresh(p.namespaces)
	p.nodes = pmap.Fresh(p.nodes)
	p.pods = pmap.Fresh(p.pods)
	p.services = pmap.Fresh(p.services)
	p.slices = pmap.Fresh(p.slices)
	p.netpols = pmap.Fresh(p.netpols)
	p.objects = pmap.Fresh(p.objects)
}

// NewStore returns an empty, unsynced store whose pods get identities in td.
func NewStore(td spiffeid.TrustDomain) (*Store, error) {
	if td.IsZero() {
		return nil, fmt.Errorf("creating state store: empty trust domain")
	}
	s := &Store{td: td, subs: make(map[chan struct{}]struct{})}
	s.pend.clear()
	s.prev = emptySnapshot(td)
	s.idx.reset()
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
	base := s.prev
	if s.pend.reset {
		base = emptySnapshot(s.td)
		s.idx.reset()
	}
	snap := build(base, &s.pend, &s.idx, s.version, s.synced)
	s.prev = snap
	s.pend.clear()
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
// belong to the store afterwards and must not be modified by the caller,
// nor given to another store while this one may still build from them: the
// store fills a new Pod's computed fields into the value itself (see
// Pod.computed).
// Subscribers are told when fn changed anything.
func (s *Store) Update(fn func(tx *Tx)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	tx := &Tx{s: s}
	fn(tx)
	tx.s = nil
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
	s       *Store
	changed bool
}

// Reset removes everything, for a source that replaces the whole state.
func (tx *Tx) Reset() {
	tx.s.pend.clear()
	tx.s.pend.reset = true
	tx.changed = true
}

// base is the state pending changes apply to, nil after a Reset.
func (tx *Tx) base() *Snapshot {
	if tx.s.pend.reset {
		return nil
	}
	return tx.s.prev
}

// SetNamespace adds or replaces a namespace.
func (tx *Tx) SetNamespace(n *Namespace) {
	tx.s.pend.namespaces[n.Name] = n
	tx.changed = true
}

// DeleteNamespace removes a namespace.
func (tx *Tx) DeleteNamespace(name string) {
	remove(tx, tx.s.pend.namespaces, name, func(b *Snapshot) bool { _, ok := b.namespaces.Get(name); return ok })
}

// SetNode adds or replaces a node.
func (tx *Tx) SetNode(n *Node) {
	tx.s.pend.nodes[n.Name] = n
	tx.changed = true
}

// DeleteNode removes a node.
func (tx *Tx) DeleteNode(name string) {
	remove(tx, tx.s.pend.nodes, name, func(b *Snapshot) bool { _, ok := b.nodes.Get(name); return ok })
}

// SetPod adds or replaces a pod.
func (tx *Tx) SetPod(p *Pod) {
	tx.s.pend.pods[p.Key()] = p
	tx.changed = true
}

// DeletePod removes a pod.
func (tx *Tx) DeletePod(k Key) {
	remove(tx, tx.s.pend.pods, k, func(b *Snapshot) bool { _, ok := b.pods.Get(k); return ok })
}

// SetService adds or replaces a service.
func (tx *Tx) SetService(svc *Service) {
	tx.s.pend.services[svc.Key()] = svc
	tx.changed = true
}

// DeleteService removes a service.
func (tx *Tx) DeleteService(k Key) {
	remove(tx, tx.s.pend.services, k, func(b *Snapshot) bool { _, ok := b.services.Get(k); return ok })
}

// SetEndpointSlice adds or replaces an EndpointSlice.
func (tx *Tx) SetEndpointSlice(es *EndpointSlice) {
	tx.s.pend.slices[es.Key()] = es
	tx.changed = true
}

// DeleteEndpointSlice removes an EndpointSlice.
func (tx *Tx) DeleteEndpointSlice(k Key) {
	remove(tx, tx.s.pend.slices, k, func(b *Snapshot) bool { _, ok := b.slices.Get(k); return ok })
}

// SetNetworkPolicy adds or replaces a NetworkPolicy.
func (tx *Tx) SetNetworkPolicy(np *NetworkPolicy) {
	tx.s.pend.netpols[Key{np.Namespace, np.Name}] = np
	tx.changed = true
}

// DeleteNetworkPolicy removes a NetworkPolicy.
func (tx *Tx) DeleteNetworkPolicy(k Key) {
	remove(tx, tx.s.pend.netpols, k, func(b *Snapshot) bool { _, ok := b.netpols.Get(k); return ok })
}

// SetObject adds or replaces a custom object.
func (tx *Tx) SetObject(o *Object) {
	m := tx.s.pend.objects[o.GroupKind]
	if m == nil {
		m = make(map[Key]*Object)
		tx.s.pend.objects[o.GroupKind] = m
	}
	m[o.Key()] = o
	tx.changed = true
}

// DeleteObject removes a custom object.
func (tx *Tx) DeleteObject(gk GroupKind, k Key) {
	m := tx.s.pend.objects[gk]
	if m == nil {
		m = make(map[Key]*Object)
		tx.s.pend.objects[gk] = m
	}
	remove(tx, m, k, func(b *Snapshot) bool {
		objs, ok := b.objects[gk]
		if !ok {
			return false
		}
		_, ok = objs.Get(k)
		return ok
	})
}

// remove records the deletion of k when it exists: pending, or in the
// base when nothing is pending for it.
func remove[K comparable, V any](tx *Tx, pend map[K]*V, k K, inBase func(*Snapshot) bool) {
	exists := false
	if v, ok := pend[k]; ok {
		exists = v != nil
	} else if b := tx.base(); b != nil {
		exists = inBase(b)
	}
	if exists {
		pend[k] = nil
		tx.changed = true
	}
}
