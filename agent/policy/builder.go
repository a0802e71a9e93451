package policy

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync/atomic"

	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// Builder builds successive snapshots of one changing cluster, reusing what
// did not change since its previous Build:
//
//   - a policy object given by the same pointer as last time is not
//     compiled again (inputs are immutable: a changed object is a new one);
//   - a pod whose value is unchanged, in a namespace whose set of policies
//     (its NetworkPolicies, AuthorizationPolicies and PeerAuthentications,
//     and the root namespace's mesh-wide ones) is unchanged, keeps its entry
//     (the policies that select it) without matching a selector again.
//
// A change to one pod thus re-matches that pod only, and a change to a
// policy re-matches the pods of its namespace only (all pods for a
// mesh-wide one). The rest of a build is map work linear in the number of
// pods. Reused entries are shared with the previous snapshot, which is
// what lets an Engine keep the decisions a change cannot affect.
//
// Build(v, in) returns a snapshot that decides exactly as NewSnapshot(v, in,
// opts) does (TestBuilderMatchesFullRebuild checks it over random changes).
// A Builder is not safe for concurrent use; its snapshots are.
type Builder struct {
	opts Options
	prev *Snapshot
	// nsPolicies of the previous build, by namespace.
	prevNS map[string]*nsPolicies
	// namespace labels of the previous build: the input map and the
	// snapshot's copy (with the name label).
	nsIn, nsOut map[string]map[string]string
	nps         map[*networkingv1.NetworkPolicy]*netPol
	azs         map[*v1alpha1.AuthorizationPolicy]*authzPolicy
	pas         map[*v1alpha1.PeerAuthentication]*peerAuthn
}

// NewBuilder returns a Builder with nothing to reuse yet.
func NewBuilder(opts Options) *Builder {
	if opts.RootNamespace == "" {
		opts.RootNamespace = DefaultRootNamespace
	}
	if opts.TrustDomain == "" {
		opts.TrustDomain = DefaultTrustDomain
	}
	return &Builder{opts: opts}
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

// Build indexes in as version, reusing what is unchanged since the
// previous Build.
func (b *Builder) Build(version uint64, in Input) *Snapshot {
	opts := b.opts
	s := &Snapshot{
		id:         snapshotIDs.Add(1),
		version:    version,
		opts:       opts,
		namespaces: make(map[string]map[string]string, len(in.Namespaces)),
		pods:       make(map[string]*podEntry, len(in.Pods)),
		podsByIP:   make(map[netip.Addr]*podEntry, len(in.Pods)),
		nodeByIP:   make(map[netip.Addr]string, len(in.Nodes)),
		nodeIPs:    make(map[string][]netip.Addr, len(in.Nodes)),
	}
	nsIn := make(map[string]map[string]string, len(in.Namespaces))
	for _, ns := range in.Namespaces {
		nsIn[ns.Name] = ns.Labels
		if old, ok := b.nsIn[ns.Name]; ok && maps.Equal(old, ns.Labels) {
			s.namespaces[ns.Name] = b.nsOut[ns.Name]
			continue
		}
		l := make(map[string]string, len(ns.Labels)+1)
		maps.Copy(l, ns.Labels)
		l[NamespaceNameLabel] = ns.Name
		s.namespaces[ns.Name] = l
	}
	for _, n := range in.Nodes {
		for _, ip := range n.IPs {
			s.nodeByIP[ip.Unmap()] = n.Name
		}
		s.nodeIPs[n.Name] = append(s.nodeIPs[n.Name], n.IPs...)
	}

	// Compile the policies (or take last build's), with the stand-ins for
	// unreadable ones.
	npsCache := make(map[*networkingv1.NetworkPolicy]*netPol, len(in.NetworkPolicies))
	nps := make([]*netPol, 0, len(in.NetworkPolicies))
	for _, np := range in.NetworkPolicies {
		if np == nil {
			continue
		}
		c, ok := b.nps[np]
		if !ok {
			c, _ = compileNetworkPolicy(np)
		}
		npsCache[np] = c
		if c.refused != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: c.refused})
		}
		nps = append(nps, c)
	}
	var unreadableAZ []*authzPolicy
	var unreadablePA []*peerAuthn
	for _, u := range in.Unreadable {
		err := fmt.Errorf("unreadable: %w", u.Err)
		if u.Err == nil {
			err = errors.New("unreadable")
		}
		s.problems = append(s.problems, Problem{Ref: u.Ref, Err: err})
		switch u.Ref.Kind {
		case KindNetworkPolicy:
			nps = append(nps, &netPol{ref: u.Ref, podSel: labels.Everything(), ingress: true, egress: true, refused: err})
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
			unreadableAZ = append(unreadableAZ, c)
		case KindPeerAuthentication:
			unreadablePA = append(unreadablePA, &peerAuthn{ref: u.Ref, mode: v1alpha1.MTLSStrict, refused: err})
		}
	}
	slices.SortFunc(nps, func(a, b *netPol) int { return a.ref.compare(b.ref) })
	s.netpolCount = len(nps)

	azsCache := make(map[*v1alpha1.AuthorizationPolicy]*authzPolicy, len(in.AuthorizationPolicies))
	azs := make([]*authzPolicy, 0, len(in.AuthorizationPolicies))
	for _, ap := range in.AuthorizationPolicies {
		if ap == nil {
			continue
		}
		c, ok := b.azs[ap]
		if !ok {
			c, _ = compileAuthorizationPolicy(ap)
		}
		azsCache[ap] = c
		if c.refused != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: c.refused})
		}
		for _, r := range c.rules {
			for _, w := range r.when {
				if !slices.Contains(s.requestHeaders, w.Header) {
					s.requestHeaders = append(s.requestHeaders, w.Header)
				}
			}
		}
		azs = append(azs, c)
	}
	slices.Sort(s.requestHeaders)
	azs = append(azs, unreadableAZ...)
	slices.SortFunc(azs, func(a, b *authzPolicy) int { return a.ref.compare(b.ref) })
	s.authzCount = len(azs)

	pasCache := make(map[*v1alpha1.PeerAuthentication]*peerAuthn, len(in.PeerAuthentications))
	pas := make([]*peerAuthn, 0, len(in.PeerAuthentications))
	for _, pa := range in.PeerAuthentications {
		if pa == nil {
			continue
		}
		c, ok := b.pas[pa]
		if !ok {
			c, _ = compilePeerAuthentication(pa)
		}
		pasCache[pa] = c
		if c.refused != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: c.refused})
		}
		pas = append(pas, c)
	}
	pas = append(pas, unreadablePA...)
	// Oldest first, as Istio resolves conflicts, then by name for stability.
	slices.SortFunc(pas, func(a, b *peerAuthn) int {
		if c := a.created.Compare(b.created); c != 0 {
			return c
		}
		return a.ref.compare(b.ref)
	})
	s.paCount = len(pas)
	slices.SortFunc(s.problems, func(a, b Problem) int { return a.Ref.compare(b.Ref) })

	// Group the policies by the namespaces whose pods they can select.
	npsByNS := map[string][]*netPol{}
	for _, np := range nps {
		npsByNS[np.ref.Namespace] = append(npsByNS[np.ref.Namespace], np)
	}
	azsByNS := map[string][]*authzPolicy{}
	var rootAZs []*authzPolicy // the root's selector-less ones: every pod
	for _, az := range azs {
		azsByNS[az.ref.Namespace] = append(azsByNS[az.ref.Namespace], az)
		if az.ref.Namespace == opts.RootNamespace && az.selector == nil {
			rootAZs = append(rootAZs, az)
		}
	}
	pasByNS := map[string][]*peerAuthn{}
	var rootPAs []*peerAuthn
	for _, pa := range pas {
		pasByNS[pa.ref.Namespace] = append(pasByNS[pa.ref.Namespace], pa)
		if pa.ref.Namespace == opts.RootNamespace && pa.selector == nil {
			rootPAs = append(rootPAs, pa)
		}
	}
	curNS := map[string]*nsPolicies{}
	reusable := map[string]bool{}
	policiesOf := func(ns string) (*nsPolicies, bool) {
		if p, ok := curNS[ns]; ok {
			return p, reusable[ns]
		}
		p := &nsPolicies{nps: npsByNS[ns], pas: pasByNS[ns]}
		if ns == opts.RootNamespace {
			p.azs = azsByNS[ns]
		} else {
			p.azs = mergeByRef(rootAZs, azsByNS[ns])
			p.rootPAs = rootPAs
		}
		curNS[ns] = p
		reusable[ns] = p.equal(b.prevNS[ns])
		return p, reusable[ns]
	}

	for i := range in.Pods {
		p := &in.Pods[i]
		if _, ok := s.namespaces[p.Namespace]; !ok {
			s.namespaces[p.Namespace] = map[string]string{NamespaceNameLabel: p.Namespace}
		}
		pol, same := policiesOf(p.Namespace)
		key := p.Key()
		var e *podEntry
		if b.prev != nil && same {
			if old := b.prev.pods[key]; old != nil && old.Pod.equal(p) {
				e = old
			}
		}
		if e == nil {
			e = &podEntry{Pod: *p, spiffeID: s.SPIFFEID(*p)}
			attach(e, pol)
		}
		s.pods[key] = e
		if !p.HostNetwork {
			for _, ip := range p.IPs {
				s.podsByIP[ip.Unmap()] = e
			}
		}
	}

	b.prev, b.prevNS = s, curNS
	b.nsIn, b.nsOut = nsIn, s.namespaces
	b.nps, b.azs, b.pas = npsCache, azsCache, pasCache
	return s
}

// attach records in e the policies of pol that select its pod, in pol's
// order.
func attach(e *podEntry, pol *nsPolicies) {
	ls := labelSet(e.Labels)
	for _, np := range pol.nps {
		if !np.podSel.Matches(ls) {
			continue
		}
		if np.ingress {
			e.ingressNPs = append(e.ingressNPs, np)
		}
		if np.egress {
			e.egressNPs = append(e.egressNPs, np)
		}
	}
	for _, az := range pol.azs {
		if az.selector != nil && !az.selector.Matches(ls) {
			continue
		}
		switch az.action {
		case v1alpha1.ActionDeny:
			e.denyAZ = append(e.denyAZ, az)
		case v1alpha1.ActionAudit:
			e.auditAZ = append(e.auditAZ, az)
		default:
			e.allowAZ = append(e.allowAZ, az)
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
			e.mtls = append(e.mtls, pa)
		}
	}
	if len(pol.rootPAs) > 0 {
		e.mtls = append(e.mtls, pol.rootPAs[0])
	}
}

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
