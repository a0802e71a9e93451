package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/rollout"
)

// marker simulates the node marks of a large cluster: one Lease per
// synthetic node in the agents' namespace, written as rollout.Mark writes
// them and renewed every interval (one Update of the Lease as last
// written), the renewals spread evenly over the interval. Every agent
// watches every mark, so this is the API traffic each agent receives from
// the other nodes' agents at rest.
type marker struct {
	c        kubernetes.Interface
	nodes    int
	interval time.Duration
	workers  int

	leases []atomic.Pointer[coordinationv1.Lease] // as last written, by node
	paced
}

// create writes every node's Lease (or takes the one a previous point
// wrote). It returns the first error that is not "already exists".
func (m *marker) create(ctx context.Context) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: rollout.DefaultNamespace}}
	if _, err := m.c.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s for the simulated node marks: %w", rollout.DefaultNamespace, err)
	}
	m.leases = make([]atomic.Pointer[coordinationv1.Lease], m.nodes)
	leases := m.c.CoordinationV1().Leases(rollout.DefaultNamespace)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	work := make(chan int)
	for range m.workers {
		wg.Go(func() {
			for n := range work {
				l, err := leases.Create(ctx, m.lease(n), metav1.CreateOptions{})
				if apierrors.IsAlreadyExists(err) {
					l, err = leases.Get(ctx, rollout.LeaseName(simNode(n)), metav1.GetOptions{})
				}
				if err != nil {
					mu.Lock()
					first = cmpErr(first, fmt.Errorf("simulated node mark %s: %w", rollout.LeaseName(simNode(n)), err))
					mu.Unlock()
					continue
				}
				m.leases[n].Store(l)
			}
		})
	}
	for n := range m.nodes {
		select {
		case work <- n:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// lease is node n's mark, renewed now.
func (m *marker) lease(n int) *coordinationv1.Lease {
	now := metav1.NewMicroTime(time.Now())
	node := simNode(n)
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: rollout.LeaseName(node), Namespace: rollout.DefaultNamespace,
			Labels: map[string]string{rollout.LabelNode: node}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node),
			LeaseDurationSeconds: ptr.To(int32(rollout.DefaultLeaseDuration / time.Second)), AcquireTime: &now, RenewTime: &now},
	}
}

// rate is the renewals per second asked for.
func (m *marker) rate() float64 { return float64(m.nodes) / m.interval.Seconds() }

// run renews the marks round robin until ctx ends; see paced. Node n
// is handed out again only a whole round (nodes renewals) later.
func (m *marker) run(ctx context.Context) {
	leases := m.c.CoordinationV1().Leases(rollout.DefaultNamespace)
	n := -1
	m.paced.run(ctx, m.rate(), m.workers, func() int { n = (n + 1) % m.nodes; return n }, func(ctx context.Context, n int) error {
		l := m.leases[n].Load().DeepCopy()
		now := metav1.NewMicroTime(time.Now())
		l.Spec.RenewTime = &now
		got, err := leases.Update(ctx, l, metav1.UpdateOptions{})
		if err == nil {
			m.leases[n].Store(got)
		}
		return err
	})
}
