package fromstate

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// The scale benchmarks' cluster: 100 pods per namespace (10 workloads of
// 10 pods, sharing their labels), 10 NetworkPolicies and one
// AuthorizationPolicy per namespace, 20 pods per node: at 100,000 pods,
// 1,000 namespaces, 10,000 NetworkPolicies and 1,000
// AuthorizationPolicies, issue 18's shape.
const (
	scalePodsPerNS    = 100
	scaleNetpolsPerNS = 10
	scalePodsPerNode  = 20
)

func scaleNS(n int) string { return fmt.Sprintf("ns-%04d", n) }

func scaleIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
}

// scalePod is pod i; app picks its workload's labels (i%10 normally).
func scalePod(i, app int, labels []map[string]string) *state.Pod {
	return &state.Pod{Namespace: scaleNS(i / scalePodsPerNS), Name: fmt.Sprintf("pod-%06d", i),
		ServiceAccount: fmt.Sprintf("sa-%d", app), Node: fmt.Sprintf("node-%05d", i/scalePodsPerNode),
		Labels: labels[app], IPs: []netip.Addr{scaleIP(i)}, Phase: state.PodRunning,
		Ports: []state.ContainerPort{{Name: "http", Port: 8080, Protocol: "TCP"}}}
}

func scaleNamespace(n, team int) *state.Namespace {
	return &state.Namespace{Name: scaleNS(n), Labels: map[string]string{state.LabelMode: state.ModeEnabled, "team": fmt.Sprint(team)}}
}

func scaleNetpol(n, i, app int) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: scaleNS(n), Name: fmt.Sprintf("np-%d", i)},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", app)}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", (app+1)%10)}}},
				{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprint(app % 3)}}}}}}}}
}

func scaleAuthz(b testing.TB, n int, name string, app int) *state.Object {
	return object(b, AuthorizationPolicyKind, &v1alpha1.AuthorizationPolicy{
		TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "AuthorizationPolicy"},
		Spec: v1alpha1.AuthorizationPolicySpec{
			Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", app)}},
			Rules: []v1alpha1.Rule{{From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Principals: []string{"cluster.local/ns/" + scaleNS(n) + "/sa/*"}}}},
				To: []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{Ports: []string{"8080"}}}}}},
		}}, scaleNS(n), name)
}

func scaleLabels() []map[string]string {
	l := make([]map[string]string, 10)
	for app := range l {
		l[app] = map[string]string{"app": fmt.Sprintf("app-%d", app), "pod-template-hash": fmt.Sprintf("%09d", app)}
	}
	return l
}

// scaleStore is a state store holding a cluster of pods pods.
func scaleStore(b testing.TB, pods int) *state.Store {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		b.Fatal(err)
	}
	labels := scaleLabels()
	st.Update(func(tx *state.Tx) {
		for n := range pods / scalePodsPerNS {
			tx.SetNamespace(scaleNamespace(n, n%10))
			for i := range scaleNetpolsPerNS {
				tx.SetNetworkPolicy(scaleNetpol(n, i, i))
			}
			tx.SetObject(scaleAuthz(b, n, "ap-0", 0))
		}
		for i := range pods {
			tx.SetPod(scalePod(i, i%10, labels))
		}
	})
	return st
}

// BenchmarkPolicyChange is what one change costs the agent at 10,000 and
// 100,000 pods: the change applied to the state store, then the next state
// snapshot and the next policy snapshot built by the agent's long-lived
// Builder. Kinds that add and remove alternate the two, so the cluster
// keeps its size. cpu-ns/op is the process's CPU time (GC included), which
// is steadier than wall time on a shared machine.
func BenchmarkPolicyChange(b *testing.B) {
	for _, pods := range []int{10000, 100000} {
		if pods > 10000 && testing.Short() {
			continue
		}
		nss := pods / scalePodsPerNS
		labels := scaleLabels()
		kinds := []struct {
			name   string
			change func(tx *state.Tx, i int)
		}{
			{"pod-relabel", func(tx *state.Tx, i int) {
				p := (i * 7919) % pods
				tx.SetPod(scalePod(p, (p+1+i%2)%10, labels))
			}},
			{"pod-add-remove", func(tx *state.Tx, i int) {
				p := scalePod(pods+i/2, i/2%10, labels)
				p.Namespace = scaleNS(i / 2 % nss) // an existing namespace
				if i%2 == 0 {
					tx.SetPod(p)
				} else {
					tx.DeletePod(p.Key())
				}
			}},
			{"namespace-relabel", func(tx *state.Tx, i int) {
				n := (i * 7) % nss
				tx.SetNamespace(scaleNamespace(n, n%10+1+i%2))
			}},
			{"namespace-enrollment-flip", func(tx *state.Tx, i int) {
				n := (i / 2 * 7) % nss
				ns := scaleNamespace(n, n%10)
				if i%2 == 0 {
					delete(ns.Labels, state.LabelMode)
				}
				tx.SetNamespace(ns)
			}},
			{"netpol-change", func(tx *state.Tx, i int) {
				n := (i * 7) % nss
				tx.SetNetworkPolicy(scaleNetpol(n, i%scaleNetpolsPerNS, (i+1+i%2)%10))
			}},
			{"netpol-add-remove", func(tx *state.Tx, i int) {
				n := (i / 2 * 7) % nss
				if i%2 == 0 {
					tx.SetNetworkPolicy(scaleNetpol(n, scaleNetpolsPerNS, i%10))
				} else {
					tx.DeleteNetworkPolicy(state.Key{Namespace: scaleNS(n), Name: fmt.Sprintf("np-%d", scaleNetpolsPerNS)})
				}
			}},
			{"authz-change", func(tx *state.Tx, i int) {
				n := (i * 7) % nss
				tx.SetObject(scaleAuthz(b, n, "ap-0", 1+i%2))
			}},
			{"authz-add-remove", func(tx *state.Tx, i int) {
				n := (i / 2 * 7) % nss
				if i%2 == 0 {
					tx.SetObject(scaleAuthz(b, n, "ap-1", i%10))
				} else {
					tx.DeleteObject(AuthorizationPolicyKind, state.Key{Namespace: scaleNS(n), Name: "ap-1"})
				}
			}},
		}
		var st *state.Store
		var bl *Builder
		for _, k := range kinds {
			b.Run(fmt.Sprintf("pods=%d/%s", pods, k.name), func(b *testing.B) {
				if st == nil { // one cluster for every kind: building it takes seconds
					st = scaleStore(b, pods)
					bl = NewBuilder("")
					if _, errs := bl.Snapshot(st.Snapshot()); len(errs) > 0 {
						b.Fatal(errs)
					}
				}
				b.ReportAllocs()
				i := 0
				start := cpuTime(b)
				for b.Loop() {
					st.Update(func(tx *state.Tx) { k.change(tx, i) })
					if _, errs := bl.Snapshot(st.Snapshot()); len(errs) > 0 {
						b.Fatal(errs)
					}
					i++
				}
				b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
				// Leave the cluster as it was for the next kind.
				if i%2 == 1 {
					st.Update(func(tx *state.Tx) { k.change(tx, i) })
					bl.Snapshot(st.Snapshot())
				}
			})
		}
	}
}

func cpuTime(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
