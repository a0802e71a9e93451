package policy

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"sync/atomic"
	"unique"
	"unsafe"

	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/nodemesh/nodemesh/agent/internal/intern"
	"github.com/nodemesh/nodemesh/agent/internal/pmap"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// Builder keeps the policy snapshot of one changing cluster up to date:
// callers tell it what changed (SetPod, DeleteNamespace,
// SetNetworkPolicy, ...) and Snapshot applies those changes to the
// previous snapshot. The snapshot's maps are sharded copy-on-write maps
// (agent/internal/pmap) that a new snapshot shares with the one before
// except for the shards a change touches, so the cost of a change is what
// it touches, not the cluster's size:
//
//   - a pod change builds that pod's entry (the policies that select it)
//     and updates the addresses it had and has;
//   - a policy change compiles that policy, and re-matches the pods of its
//     namespace only if the namespace's list of policies changed (every
//     pod only for a mesh-wide policy of the root namespace);
//   - a namespace or node change replaces its labels or addresses.
//
// Every other pod keeps its entry, shared with the previous snapshot,
// which is what lets an Engine keep the decisions a change cannot affect.
//
// Build(v, in) takes a whole Input instead, finds what differs from the
// previous one and applies that: NewSnapshot is a fresh Builder's first
// Build, so the incremental and the full path are one implementation
// (TestBuilderMatchesFullRebuild compares them over random changes).
//
// Policy inputs are immutable: a changed object is a new pointer, and one
// given again by the same pointer is not compiled again. A Builder is not
// safe for concurrent use; its snapshots are.
type Builder struct {
	opts Options
	prev *Snapshot // the last snapshot built, nil before the first
	next *Snapshot // prev's maps, being edited; nil until a change needs them

	nss map[string]*nsState
	// ipClaims lists, for a pod address two or more pods claim, every
	// claimant by key; an address with one claimant is only in podsByIP.
	ipClaims map[netip.Addr][]string

	// Changes pending for the next Snapshot: pods by key (nil: deleted),
	// namespaces whose policies changed, whether the root namespace's did.
	pods      map[string]*Pod
	dirtyNS   map[string]bool
	rootDirty bool
	// policiesChanged: problems, counts or request headers to recompute.
	policiesChanged bool

	// The policy inputs by ref, to recognise one given again.
	npIn  map[PolicyRef]*networkingv1.NetworkPolicy
	azIn  map[PolicyRef]*v1alpha1.AuthorizationPolicy
	paIn  map[PolicyRef]*v1alpha1.PeerAuthentication
	unrIn map[PolicyRef]unreadableIn

	problems map[polKey]Problem
	headers  map[string]int // request headers named by conditions, with the number of policies naming each
	netpols  int
	authzs   int
	pas      int
	rootAZs  []*authzPolicy // the root namespace's selector-less ones: every pod
	rootPAs  []*peerAuthn
}

// polKey names a policy of a namespace: a readable one and an unreadable
// stand-in may share a ref.
type polKey struct {
	ref        PolicyRef
	unreadable bool
}

func (a polKey) compare(b polKey) int {
	if c := a.ref.compare(b.ref); c != 0 {
		return c
	}
	switch {
	case a.unreadable == b.unreadable:
		return 0
	case b.unreadable:
		return -1
	default:
		return 1
	}
}

type unreadableIn struct {
	action v1alpha1.Action
	err    string
}

// nsState is what the Builder knows about one namespace.
type nsState struct {
	// given: the namespace is an input; out is its labels as the snapshot
	// has them (with the name label). synth is the snapshot's labels of a
	// namespace that is not an input but has pods.
	given bool
	in    map[string]string
	out   map[string]string
	synth map[string]string
	pods  map[*podEntry]struct{}
	nps   map[polKey]*netPol
	azs   map[polKey]*authzPolicy
	pas   map[polKey]*peerAuthn
	// pol are the policies its pods are matched against; nil until needed.
	pol *nsPolicies
	// att are the policies of pol that select its pods, per label map
	// (keyed by the map's address; see attach), each held by at least one
	// of its pods' entries. Matched again when pol changes (rematch).
	att map[unsafe.Pointer]*attached
}

func (st *nsState) empty() bool {
	return !st.given && len(st.pods) == 0 && len(st.nps)+len(st.azs)+len(st.pas) == 0
}

// NewBuilder returns a Builder with nothing to reuse yet.
func NewBuilder(opts Options) *Builder {
	if opts.RootNamespace == "" {
		opts.RootNamespace = DefaultRootNamespace
	}
	if opts.TrustDomain == "" {
		opts.TrustDomain = DefaultTrustDomain
	}
	return &Builder{
		opts: opts, nss: map[string]*nsState{}, ipClaims: map[netip.Addr][]string{},
		pods: map[string]*Pod{}, dirtyNS: map[string]bool{},
		npIn: map[PolicyRef]*networkingv1.NetworkPolicy{}, azIn: map[PolicyRef]*v1alpha1.AuthorizationPolicy{},
		paIn: map[PolicyRef]*v1alpha1.PeerAuthentication{}, unrIn: map[PolicyRef]unreadableIn{},
		problems: map[polKey]Problem{}, headers: map[string]int{},
	}
}

// nsPolicies are the policies that can select the pods of one namespace,
// in the order the snapshot attaches them.
type nsPolicies struct {
	nps []*netPol      // the namespace's, by name
	azs []*authzPolicy // the namespace's and the root's mesh-wide ones, by namespace and name
	pas []*peerAuthn   // the namespace's, oldest first
	// rootPAs are the root namespace's mesh-wide PeerAuthentications,
	// oldest first (none for the root namespace's own pods).
	rootPAs []*peerAuthn
}

func (a *nsPolicies) equal(b *nsPolicies) bool {
	return a != nil && b != nil && slices.Equal(a.nps, b.nps) && slices.Equal(a.azs, b.azs) &&
		slices.Equal(a.pas, b.pas) && slices.Equal(a.rootPAs, b.rootPAs)
}

// snapshotIDs numbers snapshots, so an Engine can tell two snapshots apart
// even when their versions are equal.
var snapshotIDs atomic.Uint64

func emptySnapshot(opts Options) *Snapshot {
	return &Snapshot{
		opts:       opts,
		namespaces: pmap.New[string, map[string]string](pmap.String),
		pods:       pmap.New[string, *podEntry](pmap.String),
		podsByIP:   pmap.NewAddrMap[*podEntry](),
		nodeIPs:    pmap.New[string, []netip.Addr](pmap.String),
	}
}

// edit returns the snapshot being edited, starting it from the previous one.
func (b *Builder) edit() *Snapshot {
	if b.next == nil {
		base := b.prev
		if base == nil {
			base = emptySnapshot(b.opts)
		}
		n := *base
		n.namespaces = base.namespaces.Edit()
		n.pods = base.pods.Edit()
		n.podsByIP = base.podsByIP.Edit()
		n.nodeIPs = base.nodeIPs.Edit()
		b.next = &n
	}
	return b.next
}

// ns returns the state of namespace name, creating it.
func (b *Builder) ns(name string) *nsState {
	st := b.nss[name]
	if st == nil {
		st = &nsState{pods: map[*podEntry]struct{}{}, nps: map[polKey]*netPol{}, azs: map[polKey]*authzPolicy{}, pas: map[polKey]*peerAuthn{}}
		b.nss[name] = st
	}
	return st
}

// current returns the entry of pod key in the last snapshot built.
func (b *Builder) current(key string) *podEntry {
	if b.prev == nil {
		return nil
	}
	return b.prev.pods.Lookup(key)
}

// SetPod adds or replaces a pod. Its label map and slices are kept as
// given: do not modify them afterwards.
func (b *Builder) SetPod(p Pod) {
	key := p.Key()
	if e := b.current(key); e != nil && e.Pod.equal(&p) {
		delete(b.pods, key) // unchanged (again)
		return
	}
	b.pods[key] = &p
}

// DeletePod removes the pod "namespace/name".
func (b *Builder) DeletePod(key string) {
	if b.current(key) == nil {
		delete(b.pods, key)
		return
	}
	b.pods[key] = nil
}

// SetNamespace adds or replaces a namespace. Its label map is kept (to
// recognise the same labels given again): do not modify it afterwards.
func (b *Builder) SetNamespace(ns Namespace) {
	st := b.ns(ns.Name)
	if st.given && maps.Equal(st.in, ns.Labels) {
		return
	}
	l := make(map[string]string, len(ns.Labels)+1)
	maps.Copy(l, ns.Labels)
	l[NamespaceNameLabel] = ns.Name
	st.given, st.in, st.out = true, ns.Labels, l
	b.setNamespaceLabels(ns.Name, st)
}

// DeleteNamespace removes a namespace. Its pods and policies stay; its
// pods' namespace then has only the kubernetes.io/metadata.name label.
func (b *Builder) DeleteNamespace(name string) {
	st := b.nss[name]
	if st == nil || !st.given {
		return
	}
	st.given, st.in, st.out = false, nil, nil
	b.setNamespaceLabels(name, st)
}

// setNamespaceLabels puts a namespace's labels in the snapshot being
// edited: its input's, else, while it has pods, only the name label.
func (b *Builder) setNamespaceLabels(name string, st *nsState) {
	s := b.edit()
	switch {
	case st.given:
		s.namespaces.Set(name, st.out)
	case len(st.pods) > 0:
		if st.synth == nil {
			st.synth = map[string]string{NamespaceNameLabel: name}
		}
		s.namespaces.Set(name, st.synth)
	default:
		s.namespaces.Del(name)
	}
	if st.empty() {
		delete(b.nss, name)
	}
}

// SetNode adds or replaces a node and its addresses.
func (b *Builder) SetNode(n Node) {
	s := b.edit()
	if old, ok := s.nodeIPs.Get(n.Name); ok && slices.Equal(old, n.IPs) {
		return
	}
	s.nodeIPs.Set(n.Name, slices.Clone(n.IPs))
}

// DeleteNode removes a node.
func (b *Builder) DeleteNode(name string) {
	if _, ok := b.edit().nodeIPs.Get(name); ok {
		b.next.nodeIPs.Del(name)
	}
}

// SetNetworkPolicy adds or replaces a NetworkPolicy (nil is ignored).
func (b *Builder) SetNetworkPolicy(np *networkingv1.NetworkPolicy) {
	if np == nil {
		return
	}
	ref := PolicyRef{Kind: KindNetworkPolicy, Namespace: np.Namespace, Name: np.Name}
	if b.npIn[ref] == np {
		return
	}
	b.npIn[ref] = np
	c, _ := compileNetworkPolicy(np)
	b.setNP(polKey{ref: ref}, c)
}

// DeleteNetworkPolicy removes a NetworkPolicy.
func (b *Builder) DeleteNetworkPolicy(namespace, name string) {
	ref := PolicyRef{Kind: KindNetworkPolicy, Namespace: namespace, Name: name}
	if _, ok := b.npIn[ref]; ok {
		delete(b.npIn, ref)
		b.setNP(polKey{ref: ref}, nil)
	}
}

// SetAuthorizationPolicy adds or replaces an AuthorizationPolicy (nil is
// ignored).
func (b *Builder) SetAuthorizationPolicy(ap *v1alpha1.AuthorizationPolicy) {
	if ap == nil {
		return
	}
	ref := PolicyRef{Kind: KindAuthorizationPolicy, Namespace: ap.Namespace, Name: ap.Name}
	if b.azIn[ref] == ap {
		return
	}
	b.azIn[ref] = ap
	c, _ := compileAuthorizationPolicy(ap)
	b.setAZ(polKey{ref: ref}, c)
}

// DeleteAuthorizationPolicy removes an AuthorizationPolicy.
func (b *Builder) DeleteAuthorizationPolicy(namespace, name string) {
	ref := PolicyRef{Kind: KindAuthorizationPolicy, Namespace: namespace, Name: name}
	if _, ok := b.azIn[ref]; ok {
		delete(b.azIn, ref)
		b.setAZ(polKey{ref: ref}, nil)
	}
}

// SetPeerAuthentication adds or replaces a PeerAuthentication (nil is
// ignored).
func (b *Builder) SetPeerAuthentication(pa *v1alpha1.PeerAuthentication) {
	if pa == nil {
		return
	}
	ref := PolicyRef{Kind: KindPeerAuthentication, Namespace: pa.Namespace, Name: pa.Name}
	if b.paIn[ref] == pa {
		return
	}
	b.paIn[ref] = pa
	c, _ := compilePeerAuthentication(pa)
	b.setPA(polKey{ref: ref}, c)
}

// DeletePeerAuthentication removes a PeerAuthentication.
func (b *Builder) DeletePeerAuthentication(namespace, name string) {
	ref := PolicyRef{Kind: KindPeerAuthentication, Namespace: namespace, Name: name}
	if _, ok := b.paIn[ref]; ok {
		delete(b.paIn, ref)
		b.setPA(polKey{ref: ref}, nil)
	}
}

// SetUnreadable adds or replaces an unreadable policy object (see
// Unreadable), by its Ref.
func (b *Builder) SetUnreadable(u Unreadable) {
	err := fmt.Errorf("unreadable: %w", u.Err)
	if u.Err == nil {
		err = errors.New("unreadable")
	}
	in := unreadableIn{action: u.Action, err: err.Error()}
	if old, ok := b.unrIn[u.Ref]; ok && old == in {
		return
	}
	b.DeleteUnreadable(u.Ref)
	b.unrIn[u.Ref] = in
	k := polKey{ref: u.Ref, unreadable: true}
	switch u.Ref.Kind {
	case KindNetworkPolicy:
		b.setNP(k, &netPol{ref: u.Ref, podSel: labels.Everything(), ingress: true, egress: true, refused: err})
	case KindAuthorizationPolicy:
		c := &authzPolicy{ref: u.Ref, refused: err}
		switch u.Action {
		case v1alpha1.ActionAllow:
			c.action = v1alpha1.ActionAllow
		case v1alpha1.ActionAudit:
			c.action = v1alpha1.ActionAudit
		default:
			c.action = v1alpha1.ActionDeny
			c.rules = []azRule{{}}
		}
		b.setAZ(k, c)
	case KindPeerAuthentication:
		b.setPA(k, &peerAuthn{ref: u.Ref, mode: v1alpha1.MTLSStrict, refused: err})
	default: // no stand-in, but still a problem
		b.problems[k] = Problem{Ref: u.Ref, Err: err}
		b.policiesChanged = true
	}
}

// DeleteUnreadable removes the unreadable policy object ref.
func (b *Builder) DeleteUnreadable(ref PolicyRef) {
	if _, ok := b.unrIn[ref]; !ok {
		return
	}
	delete(b.unrIn, ref)
	k := polKey{ref: ref, unreadable: true}
	switch ref.Kind {
	case KindNetworkPolicy:
		b.setNP(k, nil)
	case KindAuthorizationPolicy:
		b.setAZ(k, nil)
	case KindPeerAuthentication:
		b.setPA(k, nil)
	default:
		delete(b.problems, k)
		b.policiesChanged = true
	}
}

// setNP sets (c nil: removes) a compiled NetworkPolicy of a namespace.
func (b *Builder) setNP(k polKey, c *netPol) {
	st := b.ns(k.ref.Namespace)
	_, had := st.nps[k]
	if c == nil {
		delete(st.nps, k)
	} else {
		st.nps[k] = c
	}
	b.netpols += count(had, c != nil)
	b.policyChanged(k, st, c != nil && c.refused != nil, func() error { return c.refused })
}

func (b *Builder) setAZ(k polKey, c *authzPolicy) {
	st := b.ns(k.ref.Namespace)
	old, had := st.azs[k]
	if had {
		for _, h := range headersOf(old) {
			if b.headers[h]--; b.headers[h] == 0 {
				delete(b.headers, h)
			}
		}
	}
	if c == nil {
		delete(st.azs, k)
	} else {
		st.azs[k] = c
		for _, h := range headersOf(c) {
			b.headers[h]++
		}
	}
	b.authzs += count(had, c != nil)
	b.policyChanged(k, st, c != nil && c.refused != nil, func() error { return c.refused })
}

func (b *Builder) setPA(k polKey, c *peerAuthn) {
	st := b.ns(k.ref.Namespace)
	_, had := st.pas[k]
	if c == nil {
		delete(st.pas, k)
	} else {
		st.pas[k] = c
	}
	b.pas += count(had, c != nil)
	b.policyChanged(k, st, c != nil && c.refused != nil, func() error { return c.refused })
}

func count(had, has bool) int {
	switch {
	case had && !has:
		return -1
	case has && !had:
		return 1
	}
	return 0
}

// policyChanged records that policy k of namespace st changed.
func (b *Builder) policyChanged(k polKey, st *nsState, refused bool, err func() error) {
	if refused {
		b.problems[k] = Problem{Ref: k.ref, Err: err()}
	} else {
		delete(b.problems, k)
	}
	b.policiesChanged = true
	b.dirtyNS[k.ref.Namespace] = true
	if k.ref.Namespace == b.opts.RootNamespace && k.ref.Kind != KindNetworkPolicy {
		b.rootDirty = true
	}
	if st.empty() {
		delete(b.nss, k.ref.Namespace)
	}
}

// headersOf returns the request headers an AuthorizationPolicy's
// conditions name, each once.
func headersOf(c *authzPolicy) []string {
	var out []string
	for _, r := range c.rules {
		for _, w := range r.when {
			if !slices.Contains(out, w.Header) {
				out = append(out, w.Header)
			}
		}
	}
	return out
}

// policiesOf lists the policies that can select the pods of namespace
// name, in the order they are attached.
func (b *Builder) policiesOf(name string, st *nsState) *nsPolicies {
	p := &nsPolicies{nps: sortedPolicies(st.nps), pas: sortedPAs(st.pas, nil)}
	own := sortedPolicies(st.azs)
	if name == b.opts.RootNamespace {
		p.azs = own
	} else {
		p.azs = mergeByRef(b.rootAZs, own)
		p.rootPAs = b.rootPAs
	}
	return p
}

// sortedPolicies returns a namespace's policies by ref.
func sortedPolicies[T any](m map[polKey]T) []T {
	keys := slices.SortedFunc(maps.Keys(m), polKey.compare)
	out := make([]T, len(keys))
	for i, k := range keys {
		out[i] = m[k]
	}
	return out
}

// sortedPAs returns PeerAuthentications oldest first, as Istio resolves
// conflicts, then by name for stability; only those keep accepts, if set.
func sortedPAs(m map[polKey]*peerAuthn, keep func(*peerAuthn) bool) []*peerAuthn {
	type kv struct {
		k polKey
		v *peerAuthn
	}
	var list []kv
	for k, v := range m {
		if keep == nil || keep(v) {
			list = append(list, kv{k, v})
		}
	}
	slices.SortFunc(list, func(a, b kv) int { return cmp.Or(a.v.created.Compare(b.v.created), a.k.compare(b.k)) })
	out := make([]*peerAuthn, len(list))
	for i, e := range list {
		out[i] = e.v
	}
	return out
}

// Snapshot applies the changes since the previous snapshot and returns the
// new one, as version.
func (b *Builder) Snapshot(version uint64) *Snapshot {
	s := b.edit()

	// The root namespace's mesh-wide policies apply to every namespace.
	if b.rootDirty {
		b.rootDirty = false
		var azs []*authzPolicy
		var pas map[polKey]*peerAuthn
		if root := b.nss[b.opts.RootNamespace]; root != nil {
			for _, az := range sortedPolicies(root.azs) {
				if az.selector == nil {
					azs = append(azs, az)
				}
			}
			pas = root.pas
		}
		rootPAs := sortedPAs(pas, func(pa *peerAuthn) bool { return pa.selector == nil })
		if !slices.Equal(azs, b.rootAZs) || !slices.Equal(rootPAs, b.rootPAs) {
			b.rootAZs, b.rootPAs = azs, rootPAs
			for name := range b.nss {
				b.dirtyNS[name] = true
			}
		}
	}
	// Namespaces whose policies changed: their pods are matched again.
	for name := range b.dirtyNS {
		st := b.nss[name]
		if st == nil {
			continue
		}
		if pol := b.policiesOf(name, st); !pol.equal(st.pol) {
			b.rematch(st, pol)
		}
	}
	b.dirtyNS = pmap.Fresh(b.dirtyNS)

	// Pods: new entries, then the owners of the addresses they had and have.
	addrs := map[netip.Addr][]string{}
	touch := func(e *podEntry, key string) {
		if !e.HostNetwork {
			for _, ip := range e.IPs {
				addrs[ip.Unmap()] = append(addrs[ip.Unmap()], key)
			}
		}
	}
	var podsOf []string // namespaces that gained their first pod or lost their last
	for key, p := range b.pods {
		var e *podEntry
		var st *nsState
		if p != nil {
			st = b.ns(p.Namespace)
			if st.pol == nil {
				st.pol = b.policiesOf(p.Namespace, st)
			}
			// The new entry takes its policies before the old one gives
			// its own back, so a pod that kept its labels keeps them.
			e = &podEntry{Pod: *p, spiffeID: unique.Make(s.SPIFFEID(*p)).Value(), attached: st.attach(p.Labels)}
			e.Ports = portLists.Make(p.Ports)
			e.ProbePorts = probeLists.Make(p.ProbePorts)
		}
		if old := s.pods.Lookup(key); old != nil {
			ost := b.nss[old.Namespace]
			delete(ost.pods, old)
			ost.release(old.attached)
			if len(ost.pods) == 0 {
				podsOf = append(podsOf, old.Namespace)
			}
			touch(old, key)
		}
		if e == nil {
			s.pods.Del(key)
			continue
		}
		s.pods.Set(key, e)
		if len(st.pods) == 0 {
			podsOf = append(podsOf, p.Namespace)
		}
		st.pods[e] = struct{}{}
		touch(e, key)
	}
	b.pods = pmap.Fresh(b.pods)
	for ip, keys := range addrs {
		b.ownAddress(s, ip, keys)
	}
	for _, name := range podsOf {
		if st := b.nss[name]; st != nil && !st.given {
			b.setNamespaceLabels(name, st)
		}
	}

	if b.policiesChanged {
		b.policiesChanged = false
		s.problems = slices.SortedFunc(maps.Values(b.problems), func(a, b Problem) int {
			return cmp.Or(a.Ref.compare(b.Ref), cmp.Compare(a.Err.Error(), b.Err.Error()))
		})
		s.requestHeaders = slices.Sorted(maps.Keys(b.headers))
		s.netpolCount, s.authzCount, s.paCount = b.netpols, b.authzs, b.pas
	}

	s.namespaces.Freeze()
	s.pods.Freeze()
	s.podsByIP.Freeze()
	s.nodeIPs.Freeze()
	s.id, s.version = snapshotIDs.Add(1), version
	b.prev, b.next = s, nil
	return s
}

// ownAddress gives ip to its owner among its claimants: the pods that
// claimed it before (its owner and the claimants remembered when there
// were several) and the changed pods keys that claimed it or claim it now.
// Several pods claim one address only in unusual inputs (a finished pod and
// its successor, when the caller does not resolve them); the last by
// namespace/name wins, as the last in a sorted Input.
func (b *Builder) ownAddress(s *Snapshot, ip netip.Addr, keys []string) {
	cands := append(keys, b.ipClaims[ip]...)
	if e := s.podsByIP.Lookup(ip); e != nil {
		cands = append(cands, e.Key())
	}
	slices.Sort(cands)
	cands = slices.Compact(cands)
	var owner *podEntry
	claims := cands[:0]
	for _, k := range cands {
		e := s.pods.Lookup(k)
		if e == nil || e.HostNetwork || !slices.ContainsFunc(e.IPs, func(a netip.Addr) bool { return a.Unmap() == ip }) {
			continue
		}
		claims = append(claims, k)
		owner = e // cands are sorted: the last wins
	}
	if owner == nil {
		s.podsByIP.Del(ip)
	} else {
		s.podsByIP.Set(ip, owner)
	}
	if len(claims) > 1 {
		b.ipClaims[ip] = slices.Clone(claims)
	} else {
		delete(b.ipClaims, ip)
	}
}

// Build makes the builder's input in and returns its snapshot as version:
// it applies what differs between in and the previous input.
func (b *Builder) Build(version uint64, in Input) *Snapshot {
	cur := b.edit()

	seenNS := make(map[string]bool, len(in.Namespaces))
	for _, ns := range in.Namespaces {
		b.SetNamespace(ns)
		seenNS[ns.Name] = true
	}
	for name, st := range b.nss {
		if st.given && !seenNS[name] {
			b.DeleteNamespace(name)
		}
	}

	nodes := make(map[string][]netip.Addr, len(in.Nodes))
	for _, n := range in.Nodes {
		nodes[n.Name] = append(nodes[n.Name], n.IPs...)
	}
	var gone []string
	for name := range cur.nodeIPs.All() {
		if _, ok := nodes[name]; !ok {
			gone = append(gone, name)
		}
	}
	for _, name := range gone {
		b.DeleteNode(name)
	}
	for name, ips := range nodes {
		b.SetNode(Node{Name: name, IPs: ips})
	}

	seenPods := make(map[string]bool, len(in.Pods))
	for _, p := range in.Pods {
		b.SetPod(p)
		seenPods[p.Key()] = true
	}
	if b.prev != nil {
		for key := range b.prev.pods.All() {
			if !seenPods[key] {
				b.DeletePod(key)
			}
		}
	}

	seen := map[PolicyRef]bool{}
	for _, np := range in.NetworkPolicies {
		if np != nil {
			b.SetNetworkPolicy(np)
			seen[PolicyRef{Kind: KindNetworkPolicy, Namespace: np.Namespace, Name: np.Name}] = true
		}
	}
	for _, ap := range in.AuthorizationPolicies {
		if ap != nil {
			b.SetAuthorizationPolicy(ap)
			seen[PolicyRef{Kind: KindAuthorizationPolicy, Namespace: ap.Namespace, Name: ap.Name}] = true
		}
	}
	for _, pa := range in.PeerAuthentications {
		if pa != nil {
			b.SetPeerAuthentication(pa)
			seen[PolicyRef{Kind: KindPeerAuthentication, Namespace: pa.Namespace, Name: pa.Name}] = true
		}
	}
	for _, ref := range slices.Collect(maps.Keys(b.npIn)) {
		if !seen[ref] {
			b.DeleteNetworkPolicy(ref.Namespace, ref.Name)
		}
	}
	for _, ref := range slices.Collect(maps.Keys(b.azIn)) {
		if !seen[ref] {
			b.DeleteAuthorizationPolicy(ref.Namespace, ref.Name)
		}
	}
	for _, ref := range slices.Collect(maps.Keys(b.paIn)) {
		if !seen[ref] {
			b.DeletePeerAuthentication(ref.Namespace, ref.Name)
		}
	}
	seenUnr := map[PolicyRef]bool{}
	for _, u := range in.Unreadable {
		b.SetUnreadable(u)
		seenUnr[u.Ref] = true
	}
	for _, ref := range slices.Collect(maps.Keys(b.unrIn)) {
		if !seenUnr[ref] {
			b.DeleteUnreadable(ref)
		}
	}
	return b.Snapshot(version)
}

// rematch gives namespace st the policies pol. Each label map its pods
// use is matched against pol once; only the pods whose lists of policies
// that select them change get new entries. The others keep theirs, so a
// policy change copies only the shards of the pods it can matter to, and
// an Engine keeps its decisions about the rest: a decision reads a pod's
// policies only through those lists (NetworkPolicies, Authorization-
// Policies and the PeerAuthentication candidates that select it).
func (b *Builder) rematch(st *nsState, pol *nsPolicies) {
	st.pol = pol
	var changed map[*attached]bool
	for k, a := range st.att {
		n := &attached{labels: a.labels}
		n.match(pol)
		if n.sameLists(a) {
			continue
		}
		// Its pods take lists matched again (attach) and give this one
		// back, which is no longer in the table.
		delete(st.att, k)
		if changed == nil {
			changed = map[*attached]bool{}
		}
		changed[a] = true
	}
	for e := range st.pods {
		if !changed[e.attached] {
			continue
		}
		if _, ok := b.pods[e.Key()]; !ok {
			b.pods[e.Key()] = &e.Pod
		}
	}
}

// sameLists reports whether a and o list the same policies.
func (a *attached) sameLists(o *attached) bool {
	return slices.Equal(a.ingressNPs, o.ingressNPs) && slices.Equal(a.egressNPs, o.egressNPs) &&
		slices.Equal(a.denyAZ, o.denyAZ) && slices.Equal(a.allowAZ, o.allowAZ) &&
		slices.Equal(a.auditAZ, o.auditAZ) && slices.Equal(a.mtls, o.mtls)
}

// attach returns the policies of the namespace's pol that select a pod
// with labels, taking a reference. Pods whose label maps are one map (the
// agent interns label sets, so the pods of one workload share theirs)
// share one list: it depends only on the labels and pol. The key is the
// map's address; the entry holds the map, so no other map can take that
// address while it lives, and inputs are immutable, so one address means
// one content. Equal maps at different addresses just get lists of their
// own.
func (st *nsState) attach(labels map[string]string) *attached {
	k := reflect.ValueOf(labels).UnsafePointer() // nil for a nil map
	a := st.att[k]
	if a == nil {
		a = &attached{labels: labels}
		a.match(st.pol)
		if st.att == nil {
			st.att = map[unsafe.Pointer]*attached{}
		}
		st.att[k] = a
	}
	a.refs++
	return a
}

// release gives back a pod entry's reference to its policies; the last
// one removes them from the namespace's table, unless pol changed since
// (then they are no longer in it).
func (st *nsState) release(a *attached) {
	if a.refs--; a.refs > 0 {
		return
	}
	if k := reflect.ValueOf(a.labels).UnsafePointer(); st.att[k] == a {
		delete(st.att, k)
	}
}

// match records in a the policies of pol that select pods with its
// labels, in pol's order.
func (a *attached) match(pol *nsPolicies) {
	ls := labelSet(a.labels)
	for _, np := range pol.nps {
		if !np.podSel.Matches(ls) {
			continue
		}
		if np.ingress {
			a.ingressNPs = append(a.ingressNPs, np)
		}
		if np.egress {
			a.egressNPs = append(a.egressNPs, np)
		}
	}
	for _, az := range pol.azs {
		if az.selector != nil && !az.selector.Matches(ls) {
			continue
		}
		switch az.action {
		case v1alpha1.ActionDeny:
			a.denyAZ = append(a.denyAZ, az)
		case v1alpha1.ActionAudit:
			a.auditAZ = append(a.auditAZ, az)
		default:
			a.allowAZ = append(a.allowAZ, az)
		}
	}
	// PeerAuthentications: candidates narrowest first; the oldest of each
	// scope wins.
	var workload, nsWide *peerAuthn
	for _, pa := range pol.pas {
		switch {
		case pa.selector != nil:
			if workload == nil && pa.selector.Matches(ls) {
				workload = pa
			}
		case nsWide == nil:
			nsWide = pa
		}
	}
	for _, pa := range []*peerAuthn{workload, nsWide} {
		if pa != nil {
			a.mtls = append(a.mtls, pa)
		}
	}
	if len(pol.rootPAs) > 0 {
		a.mtls = append(a.mtls, pol.rootPAs[0])
	}
}

// portLists interns the pod entries' port lists: the pods of one workload
// declare the same ports.
var portLists = intern.NewPorts(func(p ContainerPort) (string, int64, string) {
	return p.Name, int64(p.Port), string(p.Protocol)
})

// probeLists interns the pod entries' probe port lists.
var probeLists intern.Ints[int32]

// mergeByRef merges two lists sorted by ref.
func mergeByRef(a, b []*authzPolicy) []*authzPolicy {
	if len(a) == 0 {
		return b
	}
	if len(b) == 0 {
		return a
	}
	out := make([]*authzPolicy, 0, len(a)+len(b))
	for len(a) > 0 && len(b) > 0 {
		if a[0].ref.compare(b[0].ref) <= 0 {
			out, a = append(out, a[0]), a[1:]
		} else {
			out, b = append(out, b[0]), b[1:]
		}
	}
	out = append(out, a...)
	return append(out, b...)
}

// equal reports whether two pods are the same input.
func (p *Pod) equal(o *Pod) bool {
	return p.Namespace == o.Namespace && p.Name == o.Name && p.ServiceAccount == o.ServiceAccount &&
		p.Node == o.Node && p.HostNetwork == o.HostNetwork && p.Unmeshed == o.Unmeshed &&
		maps.Equal(p.Labels, o.Labels) && slices.Equal(p.IPs, o.IPs) && slices.Equal(p.Ports, o.Ports) &&
		slices.Equal(p.ProbePorts, o.ProbePorts)
}
