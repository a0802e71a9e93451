package policy

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// randomWorld is a small cluster that random changes mutate the way the
// agent's state does: every change replaces an object (inputs are never
// modified in place), everything else keeps its pointer or value.
type randomWorld struct {
	t     *testing.T
	rnd   *rand.Rand
	ns    map[string]map[string]string
	pods  map[string]Pod
	nodes map[string][]netip.Addr
	nps   map[string]*networkingv1.NetworkPolicy
	azs   map[string]*v1alpha1.AuthorizationPolicy
	pas   map[string]*v1alpha1.PeerAuthentication
	unr   map[string]Unreadable
	// labelSets are the label maps given so far by contents: most pods
	// with equal labels get one map, as the agent's interning gives them
	// (the Builder shares their policy lists), some a map of their own.
	labelSets map[string]map[string]string
	pool      struct {
		nps []*networkingv1.NetworkPolicy
		azs []*v1alpha1.AuthorizationPolicy
		pas []*v1alpha1.PeerAuthentication
	}
}

var (
	rwNamespaces = []string{"ns-a", "ns-b", "ns-c", DefaultRootNamespace}
	rwApps       = []string{"a", "b", "c"}
)

func (w *randomWorld) pick(list []string) string { return list[w.rnd.IntN(len(list))] }

// labels returns l, or the map with l's contents given before.
func (w *randomWorld) labels(l map[string]string) map[string]string {
	if w.rnd.IntN(4) == 0 {
		return l
	}
	key := fmt.Sprint(l) // sorted by key
	if m, ok := w.labelSets[key]; ok {
		return m
	}
	if w.labelSets == nil {
		w.labelSets = map[string]map[string]string{}
	}
	w.labelSets[key] = l
	return l
}

func rwIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + i)}) }

func rwNodeIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 168, 0, byte(1 + i)}) }

func (w *randomWorld) randomPod(ns, name string) Pod {
	p := Pod{Namespace: ns, Name: name,
		Labels:         map[string]string{"app": w.pick(rwApps)},
		IPs:            []netip.Addr{rwIP(w.rnd.IntN(40))},
		ServiceAccount: w.pick([]string{"sa-0", "sa-1", ""}),
		Node:           w.pick([]string{"n0", "n1", "n2"}),
		HostNetwork:    w.rnd.IntN(20) == 0,
		Unmeshed:       w.rnd.IntN(4) == 0,
	}
	if w.rnd.IntN(2) == 0 {
		p.Labels["tier"] = w.pick([]string{"x", "y"})
	}
	p.Labels = w.labels(p.Labels)
	if w.rnd.IntN(2) == 0 {
		p.Ports = []ContainerPort{{Name: "http", Port: []int32{80, 8080}[w.rnd.IntN(2)], Protocol: corev1.ProtocolTCP}}
	}
	if w.rnd.IntN(3) == 0 {
		p.ProbePorts = []int32{8081}
	}
	return p
}

// decode decodes one policy document with the tests' strict decoder.
func (w *randomWorld) decode(doc string) Input {
	var in Input
	if err := decodePolicies("random", []byte(doc), &in); err != nil {
		w.t.Fatalf("decoding %s: %v", doc, err)
	}
	return in
}

func (w *randomWorld) fillPool() {
	for _, ns := range rwNamespaces {
		for _, a := range rwApps {
			b := rwApps[(slices.Index(rwApps, a)+1)%len(rwApps)]
			for i, spec := range []string{
				"podSelector: {matchLabels: {app: " + a + "}}\npolicyTypes: [Ingress]",
				"podSelector: {matchLabels: {app: " + a + "}}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: " + b + "}}\n  ports:\n  - port: http",
				"podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: " + a + "}}\n    podSelector: {matchExpressions: [{key: tier, operator: Exists}]}",
				"podSelector: {matchLabels: {tier: x}}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 10.0.0.0/29, except: [10.0.0.4/30]}\n- to:\n  - podSelector: {matchLabels: {app: " + a + "}}\n    namespaceSelector: {}\n  ports:\n  - port: 8080\n  - port: http",
				"podSelector: {matchLabels: {app: " + a + "}}\npolicyTypes: [Ingress, Egress]\ningress:\n- {}\negress:\n- to:\n  - namespaceSelector: {matchLabels: {team: " + b + "}}",
			} {
				w.pool.nps = append(w.pool.nps, w.decode(np(ns, fmt.Sprintf("np-%s-%d", a, i), spec)).NetworkPolicies...)
			}
			for i, spec := range []string{
				"selector: {matchLabels: {app: " + a + "}}\nrules:\n- from:\n  - source: {principals: [\"cluster.local/ns/" + ns + "/sa/sa-0\"]}",
				"action: DENY\nrules:\n- to:\n  - operation: {ports: [\"80\"]}\n  from:\n  - source: {namespaces: [ns-" + a + "]}",
				"action: AUDIT\nrules:\n- from:\n  - source: {notNamespaces: [" + ns + "]}",
				"rules:\n- from:\n  - source: {ipBlocks: [\"10.0.0.0/28\"]}\n- to:\n  - operation: {ports: [\"8080\"]}",
			} {
				w.pool.azs = append(w.pool.azs, w.decode(ap(ns, fmt.Sprintf("ap-%s-%d", a, i), spec)).AuthorizationPolicies...)
			}
			for i, spec := range []string{
				"mtls: {mode: STRICT}",
				"mtls: {mode: PERMISSIVE}",
				"selector: {matchLabels: {app: " + a + "}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  \"8080\": {mode: PERMISSIVE}",
			} {
				p := w.decode(pa(ns, fmt.Sprintf("pa-%s-%d", a, i), spec)).PeerAuthentications[0]
				p.CreationTimestamp = metav1.Unix(int64(w.rnd.IntN(5)), 0)
				w.pool.pas = append(w.pool.pas, p)
			}
		}
	}
}

// change applies one random change.
func (w *randomWorld) change() string {
	ns := w.pick(rwNamespaces)
	switch k := w.rnd.IntN(100); {
	case k < 35: // add or replace a pod
		name := fmt.Sprintf("p%d", w.rnd.IntN(8))
		w.pods[ns+"/"+name] = w.randomPod(ns, name)
		return "pod " + ns + "/" + name
	case k < 45: // relabel a pod (new map, same everything else)
		for key, p := range w.pods {
			p.Labels = w.labels(map[string]string{"app": w.pick(rwApps)})
			w.pods[key] = p
			return "relabel " + key
		}
	case k < 52:
		for key := range w.pods {
			delete(w.pods, key)
			return "delete pod " + key
		}
	case k < 58: // namespace labels
		l := map[string]string{}
		if w.rnd.IntN(3) > 0 {
			l["team"] = w.pick(rwApps)
		}
		if w.rnd.IntN(5) == 0 {
			delete(w.ns, ns)
			return "delete namespace " + ns
		}
		w.ns[ns] = l
		return "namespace " + ns
	case k < 62:
		n := w.pick([]string{"n0", "n1", "n2"})
		w.nodes[n] = []netip.Addr{rwNodeIP(w.rnd.IntN(4))}
		return "node " + n
	case k < 75: // set, replace (a copy: a new pointer) or delete a NetworkPolicy
		c := w.pool.nps[w.rnd.IntN(len(w.pool.nps))]
		key := c.Namespace + "/" + c.Name
		if w.rnd.IntN(3) == 0 {
			delete(w.nps, key)
			return "delete NetworkPolicy " + key
		}
		w.nps[key] = c.DeepCopy()
		return "NetworkPolicy " + key
	case k < 86:
		c := w.pool.azs[w.rnd.IntN(len(w.pool.azs))]
		key := c.Namespace + "/" + c.Name
		if w.rnd.IntN(3) == 0 {
			delete(w.azs, key)
			return "delete AuthorizationPolicy " + key
		}
		w.azs[key] = c.DeepCopy()
		return "AuthorizationPolicy " + key
	case k < 95:
		c := w.pool.pas[w.rnd.IntN(len(w.pool.pas))]
		key := c.Namespace + "/" + c.Name
		if w.rnd.IntN(3) == 0 {
			delete(w.pas, key)
			return "delete PeerAuthentication " + key
		}
		w.pas[key] = c.DeepCopy()
		return "PeerAuthentication " + key
	default: // an unreadable or refused policy comes or goes
		kind := w.pick([]string{KindNetworkPolicy, KindAuthorizationPolicy, KindPeerAuthentication})
		key := kind + "/" + ns
		if _, ok := w.unr[key]; ok {
			delete(w.unr, key)
			return "delete unreadable " + key
		}
		if kind == KindNetworkPolicy && w.rnd.IntN(2) == 0 {
			// Refused by the engine rather than unreadable.
			w.nps[ns+"/bad"] = &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "bad"},
				Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{"Sideways"}}}
			return "refused NetworkPolicy " + ns
		}
		w.unr[key] = Unreadable{Ref: PolicyRef{Kind: kind, Namespace: ns, Name: "unreadable"},
			Action: v1alpha1.Action(w.pick([]string{"ALLOW", "DENY", "AUDIT", ""}))}
		return "unreadable " + key
	}
	return "nothing"
}

// input lists the world in a random order: the engine must not depend on it.
func (w *randomWorld) input() Input {
	var in Input
	for _, name := range sortedKeys(w.ns) {
		in.Namespaces = append(in.Namespaces, Namespace{Name: name, Labels: w.ns[name]})
	}
	for _, name := range sortedKeys(w.nodes) {
		in.Nodes = append(in.Nodes, Node{Name: name, IPs: w.nodes[name]})
	}
	for _, k := range sortedKeys(w.pods) {
		in.Pods = append(in.Pods, w.pods[k])
	}
	for _, k := range sortedKeys(w.nps) {
		in.NetworkPolicies = append(in.NetworkPolicies, w.nps[k])
	}
	for _, k := range sortedKeys(w.azs) {
		in.AuthorizationPolicies = append(in.AuthorizationPolicies, w.azs[k])
	}
	for _, k := range sortedKeys(w.pas) {
		in.PeerAuthentications = append(in.PeerAuthentications, w.pas[k])
	}
	for _, k := range sortedKeys(w.unr) {
		in.Unreadable = append(in.Unreadable, w.unr[k])
	}
	return in
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func (w *randomWorld) randomFlow(in *Input) Flow {
	f := Flow{Port: []uint16{80, 8080, 8081, 9090}[w.rnd.IntN(4)], Protocol: corev1.ProtocolTCP}
	if w.rnd.IntN(10) == 0 {
		f.Protocol = corev1.ProtocolUDP
	}
	endpoint := func() (string, netip.Addr) {
		switch r := w.rnd.IntN(10); {
		case r < 3 && len(in.Pods) > 0:
			p := in.Pods[w.rnd.IntN(len(in.Pods))]
			return p.Key(), netip.Addr{}
		case r < 4:
			return "", rwNodeIP(w.rnd.IntN(4))
		default:
			return "", rwIP(w.rnd.IntN(40))
		}
	}
	f.SrcPod, f.Src = endpoint()
	f.DstPod, f.Dst = endpoint()
	if w.rnd.IntN(2) == 0 {
		f.Principal = fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/sa-%d", w.pick(rwNamespaces), w.rnd.IntN(2))
	}
	return f
}

func decisionJSON(t *testing.T, d *Decision) string {
	c := *d
	c.SnapshotVersion = 0
	b, err := json.Marshal(&c)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestBuilderMatchesFullRebuild is the incremental path's correctness
// guard: over thousands of random changes (pods, labels, namespaces, nodes,
// every policy kind, refused and unreadable policies), the snapshot a
// long-lived Builder produces and the decisions a long-lived Engine serves
// from its cache must equal what a full rebuild (NewSnapshot) decides
// afresh, for random flows, in every direction, plus the problems, counts
// and mTLS modes.
func TestBuilderMatchesFullRebuild(t *testing.T) {
	steps := 2000
	if testing.Short() {
		steps = 200
	}
	seed := uint64(rand.Int64())
	t.Logf("seed %d", seed)
	w := &randomWorld{t: t, rnd: rand.New(rand.NewPCG(seed, 18)),
		ns: map[string]map[string]string{}, pods: map[string]Pod{}, nodes: map[string][]netip.Addr{},
		nps: map[string]*networkingv1.NetworkPolicy{}, azs: map[string]*v1alpha1.AuthorizationPolicy{},
		pas: map[string]*v1alpha1.PeerAuthentication{}, unr: map[string]Unreadable{}}
	w.fillPool()
	for range 20 {
		w.change()
	}
	b := NewBuilder(Options{})
	e, err := NewEngine(4096)
	if err != nil {
		t.Fatal(err)
	}
	// A fixed set of flows is asked again after every change, so the
	// engine's cache carries decisions across changes; a few random ones
	// are added each step.
	in := w.input()
	var flows []Flow
	for range 30 {
		flows = append(flows, w.randomFlow(&in))
	}
	// Plaintext from the nodes' addresses (kubelet probes, if the pod is on
	// that node) to every pod slot.
	for i, ns := range rwNamespaces {
		for p := range 8 {
			flows = append(flows, Flow{Src: rwNodeIP((i + p) % 4), DstPod: fmt.Sprintf("%s/p%d", ns, p), Port: 8081, Protocol: corev1.ProtocolTCP})
		}
	}
	var history []string
	var prev *Snapshot
	reused, kept, shared := 0, 0, 0
	for step := range steps {
		history = append(history, w.change())
		if len(history) > 5 {
			history = history[1:]
		}
		in := w.input()
		version := uint64(step + 1)
		inc := b.Build(version, in)
		full := referenceSnapshot(version, in, Options{})
		if a, b := snapshotJSON(t, NewSnapshot(version, in, Options{})), snapshotJSON(t, full); a != b {
			t.Fatalf("step %d (seed %d): a fresh Builder's snapshot differs from the reference:\n%s\n%s", step, seed, a, b)
		}
		if a, b := snapshotJSON(t, inc), snapshotJSON(t, full); a != b {
			t.Fatalf("step %d (seed %d, last changes %s): the incremental snapshot differs from the reference:\n%s\n%s", step, seed, strings.Join(history, "; "), a, b)
		}
		if prev != nil {
			for k, e := range inc.pods.All() {
				if prev.pods.Lookup(k) == e {
					kept++
				}
			}
		}
		prev = inc
		if err := checkAttached(b, inc); err != nil {
			t.Fatalf("step %d (seed %d, last changes %s): %v", step, seed, strings.Join(history, "; "), err)
		}
		for _, e := range inc.pods.All() {
			if e.refs > 1 {
				shared++
			}
		}
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("step %d (seed %d, last changes %s): %s", step, seed, strings.Join(history, "; "), fmt.Sprintf(format, args...))
		}
		if a, b := fmt.Sprint(inc.Problems()), fmt.Sprint(full.Problems()); a != b {
			fail("problems differ:\nincremental %s\nfull        %s", a, b)
		}
		ip, in1, ia, ipa := inc.Counts()
		fp, fn, fa, fpa := full.Counts()
		if ip != fp || in1 != fn || ia != fa || ipa != fpa || !slices.Equal(inc.RequestHeaders(), full.RequestHeaders()) {
			fail("counts or request headers differ")
		}
		for _, p := range in.Pods {
			for _, port := range []uint16{80, 8080} {
				m1, by1, ok1 := inc.MTLSMode(p.Key(), port)
				m2, by2, ok2 := full.MTLSMode(p.Key(), port)
				if m1 != m2 || by1 != by2 || ok1 != ok2 {
					fail("mTLS mode of %s port %d: incremental %s %v, full %s %v", p.Key(), port, m1, by1, m2, by2)
				}
			}
		}
		ask := append(slices.Clone(flows), w.randomFlow(&in), w.randomFlow(&in), w.randomFlow(&in))
		for _, f := range ask {
			for _, dir := range []struct {
				name   string
				engine func(*Snapshot, Flow) *Decision
				fresh  func(Flow) *Decision
			}{
				{"both", e.Decide, full.Decide},
				{"egress", e.DecideEgress, full.DecideEgress},
				{"ingress", e.DecideIngress, full.DecideIngress},
			} {
				got := dir.engine(inc, f)
				if got.SnapshotVersion != version {
					reused++
				}
				if a, b := decisionJSON(t, got), decisionJSON(t, dir.fresh(f)); a != b {
					fail("%s decision for %+v differs:\nincremental+cache %s\nfull rebuild      %s", dir.name, f, a, b)
				}
				if a, b := decisionJSON(t, inc.decide(f, map[string]dirMask{"both": evalBoth, "egress": evalEgress, "ingress": evalIngress}[dir.name])), decisionJSON(t, dir.fresh(f)); a != b {
					fail("%s decision for %+v differs without the cache:\nincremental %s\nfull        %s", dir.name, f, a, b)
				}
			}
		}
	}
	t.Logf("%d steps; %d pod entries and %d cached decisions carried over from an earlier snapshot; %d pod entries shared their policy lists", steps, kept, reused, shared)
	if reused == 0 || kept == 0 || shared == 0 {
		t.Fatal("nothing was carried across a change or shared: the test does not exercise reuse")
	}
}

// checkAttached checks the Builder's tables of shared policy lists
// against its last snapshot s: each namespace's table holds exactly the
// lists its pods' entries hold under the namespace's current policies,
// each with as many references as entries, so churn cannot grow it.
func checkAttached(b *Builder, s *Snapshot) error {
	holders := map[*attached]int{}
	for k, e := range s.pods.All() {
		st := b.nss[e.Namespace]
		if st == nil {
			return fmt.Errorf("pod %s: no namespace state", k)
		}
		if _, ok := st.pods[e]; !ok {
			return fmt.Errorf("pod %s: entry not in its namespace's set", k)
		}
		holders[e.attached]++
	}
	for a, n := range holders {
		if a.refs != n {
			return fmt.Errorf("policy list for labels %v: %d references, held by %d entries", a.labels, a.refs, n)
		}
	}
	for name, st := range b.nss {
		for k, a := range st.att {
			if holders[a] == 0 {
				return fmt.Errorf("namespace %s: policy list for labels %v kept with no entry holding it", name, a.labels)
			}
			if k != reflect.ValueOf(a.labels).UnsafePointer() {
				return fmt.Errorf("namespace %s: policy list for labels %v under another map's key", name, a.labels)
			}
		}
	}
	return nil
}

// referenceSnapshot builds a snapshot of in the simplest way, straight
// from the definition and independently of Builder: every policy compiled,
// every pod matched against every policy of its namespace and the root's
// mesh-wide ones. It is the oracle TestBuilderMatchesFullRebuild checks the
// Builder (incremental or fresh) against.
func referenceSnapshot(version uint64, in Input, opts Options) *Snapshot {
	if opts.RootNamespace == "" {
		opts.RootNamespace = DefaultRootNamespace
	}
	if opts.TrustDomain == "" {
		opts.TrustDomain = DefaultTrustDomain
	}
	s := emptySnapshot(opts)
	s.id, s.version = snapshotIDs.Add(1), version
	for _, m := range []interface{ Freeze() }{&s.namespaces, &s.pods, &s.podsByIP, &s.nodeIPs} {
		defer m.Freeze()
	}
	s.namespaces, s.pods, s.podsByIP, s.nodeIPs = s.namespaces.Edit(), s.pods.Edit(), s.podsByIP.Edit(), s.nodeIPs.Edit()
	for _, ns := range in.Namespaces {
		l := map[string]string{}
		for k, v := range ns.Labels {
			l[k] = v
		}
		l[NamespaceNameLabel] = ns.Name
		s.namespaces.Set(ns.Name, l)
	}
	for _, n := range in.Nodes {
		s.nodeIPs.Set(n.Name, append(s.nodeIPs.Lookup(n.Name), n.IPs...))
	}
	var nps []*netPol
	var azs []*authzPolicy
	var pas []*peerAuthn
	headers := map[string]bool{}
	for _, np := range in.NetworkPolicies {
		if np != nil {
			c, _ := compileNetworkPolicy(np)
			nps = append(nps, c)
		}
	}
	for _, ap := range in.AuthorizationPolicies {
		if ap != nil {
			c, _ := compileAuthorizationPolicy(ap)
			azs = append(azs, c)
			for _, h := range headersOf(c) {
				headers[h] = true
			}
		}
	}
	for _, pa := range in.PeerAuthentications {
		if pa != nil {
			c, _ := compilePeerAuthentication(pa)
			pas = append(pas, c)
		}
	}
	for _, c := range nps {
		if c.refused != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: c.refused})
		}
	}
	for _, c := range azs {
		if c.refused != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: c.refused})
		}
	}
	for _, c := range pas {
		if c.refused != nil {
			s.problems = append(s.problems, Problem{Ref: c.ref, Err: c.refused})
		}
	}
	// The stand-ins of unreadable objects sort after readable ones of the
	// same name.
	unreadable := map[any]bool{}
	for _, u := range in.Unreadable {
		err := errors.New("unreadable")
		if u.Err != nil {
			err = fmt.Errorf("unreadable: %w", u.Err)
		}
		s.problems = append(s.problems, Problem{Ref: u.Ref, Err: err})
		switch u.Ref.Kind {
		case KindNetworkPolicy:
			c := &netPol{ref: u.Ref, podSel: labels.Everything(), ingress: true, egress: true, refused: err}
			unreadable[c] = true
			nps = append(nps, c)
		case KindAuthorizationPolicy:
			c := &authzPolicy{ref: u.Ref, refused: err, action: v1alpha1.ActionDeny, rules: []azRule{{}}}
			if u.Action == v1alpha1.ActionAllow || u.Action == v1alpha1.ActionAudit {
				c.action, c.rules = u.Action, nil
			}
			unreadable[c] = true
			azs = append(azs, c)
		case KindPeerAuthentication:
			c := &peerAuthn{ref: u.Ref, mode: v1alpha1.MTLSStrict, refused: err}
			unreadable[c] = true
			pas = append(pas, c)
		}
	}
	byRef := func(a, b PolicyRef, ua, ub bool) int {
		if c := a.compare(b); c != 0 {
			return c
		}
		return cmp.Compare(b2i(ua), b2i(ub))
	}
	slices.SortStableFunc(nps, func(a, b *netPol) int { return byRef(a.ref, b.ref, unreadable[a], unreadable[b]) })
	slices.SortStableFunc(azs, func(a, b *authzPolicy) int { return byRef(a.ref, b.ref, unreadable[a], unreadable[b]) })
	slices.SortStableFunc(pas, func(a, b *peerAuthn) int {
		return cmp.Or(a.created.Compare(b.created), byRef(a.ref, b.ref, unreadable[a], unreadable[b]))
	})
	slices.SortStableFunc(s.problems, func(a, b Problem) int { return cmp.Or(a.Ref.compare(b.Ref), cmp.Compare(a.Err.Error(), b.Err.Error())) })
	s.netpolCount, s.authzCount, s.paCount = len(nps), len(azs), len(pas)
	for h := range headers {
		s.requestHeaders = append(s.requestHeaders, h)
	}
	slices.Sort(s.requestHeaders)

	for _, p := range in.Pods {
		if _, ok := s.namespaces.Get(p.Namespace); !ok {
			s.namespaces.Set(p.Namespace, map[string]string{NamespaceNameLabel: p.Namespace})
		}
		e := &podEntry{Pod: p, spiffeID: s.SPIFFEID(p), attached: &attached{}}
		ls := labelSet(p.Labels)
		for _, np := range nps {
			if np.ref.Namespace != p.Namespace || !np.podSel.Matches(ls) {
				continue
			}
			if np.ingress {
				e.ingressNPs = append(e.ingressNPs, np)
			}
			if np.egress {
				e.egressNPs = append(e.egressNPs, np)
			}
		}
		for _, az := range azs {
			meshWide := az.ref.Namespace == opts.RootNamespace && az.selector == nil
			if az.ref.Namespace != p.Namespace && !meshWide || az.selector != nil && !az.selector.Matches(ls) {
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
		var workload, nsWide, mesh *peerAuthn
		for _, pa := range pas {
			switch {
			case pa.ref.Namespace == p.Namespace && pa.selector != nil && pa.selector.Matches(ls):
				if workload == nil {
					workload = pa
				}
			case pa.ref.Namespace == p.Namespace && pa.selector == nil:
				if nsWide == nil {
					nsWide = pa
				}
			case pa.ref.Namespace == opts.RootNamespace && p.Namespace != opts.RootNamespace && pa.selector == nil:
				if mesh == nil {
					mesh = pa
				}
			}
		}
		for _, pa := range []*peerAuthn{workload, nsWide, mesh} {
			if pa != nil {
				e.mtls = append(e.mtls, pa)
			}
		}
		s.pods.Set(p.Key(), e)
	}
	// An address claimed by several pods is the last one's by key.
	for _, p := range s.pods.All() {
		if p.HostNetwork {
			continue
		}
		for _, ip := range p.IPs {
			if o := s.podsByIP.Lookup(ip.Unmap()); o == nil || o.Key() < p.Key() {
				s.podsByIP.Set(ip.Unmap(), p)
			}
		}
	}
	return s
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// snapshotJSON describes everything a snapshot holds, in a stable order:
// each pod's entry with the policies attached to it, the namespaces'
// labels, the nodes' addresses, the owner of each address, problems,
// counts and request headers.
func snapshotJSON(t *testing.T, s *Snapshot) string {
	refs := func(list ...any) [][]string {
		var out [][]string
		for _, l := range list {
			var names []string
			switch l := l.(type) {
			case []*netPol:
				for _, p := range l {
					names = append(names, p.ref.String())
				}
			case []*authzPolicy:
				for _, p := range l {
					names = append(names, p.ref.String())
				}
			case []*peerAuthn:
				for _, p := range l {
					names = append(names, p.ref.String())
				}
			}
			out = append(out, names)
		}
		return out
	}
	type podOut struct {
		Pod      Pod
		SPIFFEID string
		Policies [][]string
	}
	out := struct {
		Pods       map[string]podOut
		Namespaces map[string]map[string]string
		Nodes      map[string][]netip.Addr
		Owners     map[netip.Addr]string
		Problems   []string
		Counts     []int
		Headers    []string
	}{Pods: map[string]podOut{}, Namespaces: map[string]map[string]string{}, Nodes: map[string][]netip.Addr{}, Owners: map[netip.Addr]string{}}
	for k, e := range s.pods.All() {
		out.Pods[k] = podOut{e.Pod, e.spiffeID, refs(e.ingressNPs, e.egressNPs, e.denyAZ, e.allowAZ, e.auditAZ, e.mtls)}
	}
	for k, v := range s.namespaces.All() {
		out.Namespaces[k] = v
	}
	for k, v := range s.nodeIPs.All() {
		out.Nodes[k] = v
	}
	for k, v := range s.podsByIP.All() {
		out.Owners[k] = v.Key()
	}
	for _, p := range s.problems {
		out.Problems = append(out.Problems, p.Error())
	}
	out.Counts = []int{s.pods.Len(), s.netpolCount, s.authzCount, s.paCount}
	out.Headers = s.requestHeaders
	for _, m := range []interface{ Check() error }{&s.namespaces, &s.pods, &s.podsByIP, &s.nodeIPs} {
		if err := m.Check(); err != nil {
			t.Fatal(err)
		}
	}
	b, err := json.MarshalIndent(out, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A pod entry stays in the 176-byte size class: the policy snapshot holds
// one per pod in the cluster (docs/scale.md).
func TestPodEntrySize(t *testing.T) {
	if n := unsafe.Sizeof(podEntry{}); n > 176 {
		t.Fatalf("podEntry is %d bytes, more than the 176 of its size class", n)
	}
}
