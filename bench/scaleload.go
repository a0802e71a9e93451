package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// The synthetic cluster of the scale profile. Every object is a function
// of its index, so a larger point adds objects to a smaller one: pod i
// lives in namespace i/podsPerNS on node i/podsPerNode; each namespace has
// netpolsPerNS NetworkPolicies, one AuthorizationPolicy and svcsPerNS
// Services with an EndpointSlice each. At 100,000 pods that is 5,000
// nodes, 1,000 namespaces, 10,000 NetworkPolicies, 1,000
// AuthorizationPolicies and 5,000 Services (the sizes of issue 18).
const (
	podsPerNode  = 20
	podsPerNS    = 100
	netpolsPerNS = 10
	svcsPerNS    = 5
	appsPerNS    = 10 // distinct app labels in a namespace
	simNSPrefix  = "sim-"
	simPort      = 8080
)

// synth is the shape of the synthetic cluster for a number of pods.
type synth struct {
	Pods, Nodes, Namespaces, NetworkPolicies, AuthorizationPolicies, Services int
}

func synthFor(pods int) synth {
	ns := ceilDiv(pods, podsPerNS)
	return synth{Pods: pods, Nodes: ceilDiv(pods, podsPerNode), Namespaces: ns,
		NetworkPolicies: ns * netpolsPerNS, AuthorizationPolicies: ns, Services: ns * svcsPerNS}
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

func simNS(j int) string     { return fmt.Sprintf("%s%05d", simNSPrefix, j) }
func simNode(n int) string   { return fmt.Sprintf("sim-node-%05d", n) }
func simPod(i int) string    { return fmt.Sprintf("p-%07d", i) }
func simApp(k int) string    { return fmt.Sprintf("app-%d", k%appsPerNS) }
func simTeam(j int) string   { return fmt.Sprintf("t-%d", j%7) }
func simPodNS(i int) string  { return simNS(i / podsPerNS) }
func simPodKey(i int) string { return simPodNS(i) + "/" + simPod(i) }

// simPodIP is pod i's address in 100.64.0.0/10 (no lab range uses it).
func simPodIP(i int) string {
	v := uint32(100<<24|64<<16) + uint32(i) + 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}).String()
}

// simNodeIP is node n's address in 172.16.0.0/12.
func simNodeIP(n int) string {
	v := uint32(172<<24|16<<16) + uint32(n) + 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}).String()
}

// loader creates the synthetic objects through the API server.
type loader struct {
	c       kubernetes.Interface
	dyn     dynamic.Interface // nil: no AuthorizationPolicies (CRDs missing)
	workers int
	have    synth // what is loaded already
}

// loadTimes is how long growing to a point took, by kind.
type loadTimes struct {
	Total      time.Duration            `json:"total"`
	ByKind     map[string]time.Duration `json:"byKind"`
	Objects    int                      `json:"objects"`
	Requests   int                      `json:"requests"`
	AuthzSkips string                   `json:"authzSkipped,omitempty"`
}

// grow creates what want has and l.have has not.
func (l *loader) grow(ctx context.Context, want synth) (loadTimes, error) {
	lt := loadTimes{ByKind: map[string]time.Duration{}}
	start := time.Now()
	step := func(kind string, from, to, reqsPer int, f func(ctx context.Context, i int) error) error {
		if to <= from {
			return nil
		}
		t := time.Now()
		if err := parallel(ctx, from, to, l.workers, f); err != nil {
			return fmt.Errorf("creating synthetic %s: %w", kind, err)
		}
		lt.ByKind[kind] = time.Since(t)
		lt.Objects += to - from
		lt.Requests += (to - from) * reqsPer
		return nil
	}
	if err := step("namespaces", l.have.Namespaces, want.Namespaces, 2, l.namespace); err != nil {
		return lt, err
	}
	if err := step("nodes", l.have.Nodes, want.Nodes, 1, l.node); err != nil {
		return lt, err
	}
	if err := step("pods", l.have.Pods, want.Pods, 2, l.pod); err != nil {
		return lt, err
	}
	if err := step("services", l.have.Services, want.Services, 2, l.service); err != nil {
		return lt, err
	}
	if err := step("networkpolicies", l.have.NetworkPolicies, want.NetworkPolicies, 1, l.netpol); err != nil {
		return lt, err
	}
	if l.dyn != nil {
		if err := step("authorizationpolicies", l.have.AuthorizationPolicies, want.AuthorizationPolicies, 1, l.authz); err != nil {
			return lt, err
		}
	}
	l.have = want
	lt.Total = time.Since(start)
	return lt, nil
}

// parallel runs f(i) for i in [from, to) on n workers and returns the
// first error.
func parallel(ctx context.Context, from, to, n int, f func(context.Context, int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= to || ctx.Err() != nil {
					return
				}
				if err := f(ctx, i); err != nil {
					cancel(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return context.Cause(ctx)
}

func ignoreExists(err error) error {
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// namespace j (even ones enrolled in the mesh) and its "default"
// ServiceAccount (no controller manager creates it).
func (l *loader) namespace(ctx context.Context, j int) error {
	labels := map[string]string{"team": simTeam(j)}
	if j%2 == 0 {
		labels[state.LabelMode] = state.ModeEnabled
	}
	_, err := l.c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: simNS(j), Labels: labels}}, metav1.CreateOptions{})
	if err := ignoreExists(err); err != nil {
		return err
	}
	_, err = l.c.CoreV1().ServiceAccounts(simNS(j)).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	return ignoreExists(err)
}

func (l *loader) node(ctx context.Context, n int) error {
	_, err := l.c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: simNode(n),
		Labels: map[string]string{"kubernetes.io/hostname": simNode(n), "topology.kubernetes.io/zone": fmt.Sprintf("zone-%d", n%3)}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: simNodeIP(n)}}}}, metav1.CreateOptions{})
	return ignoreExists(err)
}

// pod i, created and then given a running status with its IP, as kubelet
// would.
func (l *loader) pod(ctx context.Context, i int) error {
	ns := simPodNS(i)
	p, err := l.c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: simPod(i), Labels: map[string]string{
			"app": simApp(i), "tier": fmt.Sprintf("tier-%d", i%3), "version": fmt.Sprintf("v%d", i%2+1)}},
		Spec: corev1.PodSpec{NodeName: simNode(i / podsPerNode), ServiceAccountName: "default",
			AutomountServiceAccountToken: ptr.To(false),
			Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: simPort}}}}},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		if p, err = l.c.CoreV1().Pods(ns).Get(ctx, simPod(i), metav1.GetOptions{}); err != nil {
			return err
		}
		if p.Status.PodIP != "" {
			return nil
		}
	} else if err != nil {
		return err
	}
	ip := simPodIP(i)
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, HostIP: simNodeIP(i / podsPerNode), PodIP: ip,
		PodIPs: []corev1.PodIP{{IP: ip}}, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
	_, err = l.c.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	return err
}

// service s selects app s%svcsPerNS of its namespace; its EndpointSlice
// lists those pods.
func (l *loader) service(ctx context.Context, s int) error {
	j := s / svcsPerNS
	ns, app := simNS(j), simApp(s%svcsPerNS)
	name := fmt.Sprintf("svc-%d", s%svcsPerNS)
	_, err := l.c.CoreV1().Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": app},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(simPort)}}}}, metav1.CreateOptions{})
	if err := ignoreExists(err); err != nil {
		return err
	}
	es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: name + "-1",
		Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(simPort)), Protocol: ptr.To(corev1.ProtocolTCP)}}}
	for i := j * podsPerNS; i < (j+1)*podsPerNS; i++ {
		if simApp(i) != app {
			continue
		}
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{simPodIP(i)},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(simNode(i / podsPerNode)),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: simPod(i)}})
	}
	_, err = l.c.DiscoveryV1().EndpointSlices(ns).Create(ctx, es, metav1.CreateOptions{})
	return ignoreExists(err)
}

// netpol k of namespace k/netpolsPerNS: ingress to one app from another
// app of the namespace and from one tier of a team's namespaces.
func (l *loader) netpol(ctx context.Context, k int) error {
	j := k / netpolsPerNS
	port := intstr.FromInt32(simPort)
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("np-%d", k%netpolsPerNS)},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": simApp(k)}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{
					{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": simApp(k + 1)}}},
					{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": simTeam(j + 1)}},
						PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
							{Key: "tier", Operator: metav1.LabelSelectorOpIn, Values: []string{"tier-0", "tier-1"}}}}},
				},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: ptr.To(corev1.ProtocolTCP), Port: &port}},
			}},
		}}
	_, err := l.c.NetworkingV1().NetworkPolicies(simNS(j)).Create(ctx, np, metav1.CreateOptions{})
	return ignoreExists(err)
}

// authz j: namespace j's app-0 admits its own namespace's default
// service account and the next namespace.
func (l *loader) authz(ctx context.Context, j int) error {
	ap := &v1alpha1.AuthorizationPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "AuthorizationPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: simNS(j), Name: "allow-app-0"},
		Spec: v1alpha1.AuthorizationPolicySpec{
			Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": simApp(0)}},
			Action:   v1alpha1.ActionAllow,
			Rules: []v1alpha1.Rule{{
				From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{
					Principals: []string{"cluster.local/ns/" + simNS(j) + "/sa/default"},
					Namespaces: []string{simNS(j + 1)}}}},
				To: []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{Ports: []string{fmt.Sprint(simPort)}}}},
			}},
		},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(ap)
	if err != nil {
		return fmt.Errorf("converting an AuthorizationPolicy: %w", err)
	}
	_, err = l.dyn.Resource(v1alpha1.AuthorizationPolicyResource).Namespace(simNS(j)).Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
	return ignoreExists(err)
}

// churner changes the app label of random synthetic pods at a steady
// rate, so that policies and services select other pods.
type churner struct {
	c       kubernetes.Interface
	pods    int
	rate    float64
	workers int
	paced
}

// run churns until ctx ends; see paced.
func (ch *churner) run(ctx context.Context) {
	ch.paced.run(ctx, ch.rate, ch.workers, func() int { return rand.IntN(ch.pods) }, func(ctx context.Context, i int) error {
		patch := fmt.Sprintf(`{"metadata":{"labels":{"app":%q}}}`, simApp(rand.IntN(appsPerNS)))
		_, err := ch.c.CoreV1().Pods(simPodNS(i)).Patch(ctx, simPod(i), types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		return err
	})
}

// paced makes changes at a steady rate with a pool of workers, counting
// them. A change that finds every worker busy is counted as late and
// skipped (the API server could not keep up), so the achieved rate is
// done/elapsed.
type paced struct {
	done, errs, late atomic.Int64
}

// run calls change(ctx, next()) rate times a second on up to workers
// goroutines until ctx ends, and waits for those under way.
func (p *paced) run(ctx context.Context, rate float64, workers int, next func() int, change func(context.Context, int) error) {
	work := make(chan int, workers)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(work)
	for range workers {
		wg.Go(func() {
			for i := range work {
				if err := change(ctx, i); err != nil {
					if ctx.Err() == nil {
						p.errs.Add(1)
					}
					continue
				}
				p.done.Add(1)
			}
		})
	}
	t := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			select {
			case work <- next():
			default:
				p.late.Add(1)
			}
		}
	}
}

func (p *paced) counts() (done, errs, late int64) {
	return p.done.Load(), p.errs.Load(), p.late.Load()
}
