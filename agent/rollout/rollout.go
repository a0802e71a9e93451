// Package rollout lets agents on a partially meshed cluster know which nodes
// are mesh-capable. Each agent holds a coordination.k8s.io Lease named
// nodemesh-agent-<node> in the agent namespace while it is ready (Mark) and
// deletes it when it drains or stops; every agent watches those Leases
// (Peers) and treats a node as mesh-capable only while its Lease is fresh,
// so an agent killed without withdrawing is recognised once its Lease
// expires (the lease duration, ~10 s by default).
package rollout

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient"
)

// Defaults.
const (
	DefaultNamespace = "nodemesh-system"
	LeasePrefix      = "nodemesh-agent-"
	// DefaultLeaseDuration and DefaultRenewInterval are kubelet's node
	// lease defaults: every agent watches every node's mark, so at 5,000
	// nodes each renewal round is 5,000 writes and 5,000 watch events per
	// agent; renewing every 3 s cost 1,700 writes/s.
	DefaultLeaseDuration = 40 * time.Second
	DefaultRenewInterval = 10 * time.Second
	// LabelNode marks the Lease with its node, for humans and selectors.
	LabelNode = "nodemesh.io/node"
)

// LeaseName is the name of node's mark.
func LeaseName(node string) string { return LeasePrefix + node }

// MarkConfig configures a Mark.
type MarkConfig struct {
	Client    apiclient.Interface
	Namespace string // "" = DefaultNamespace
	Node      string
	Holder    string // holderIdentity; "" = Node
	// Duration is the lease duration peers honour; Renew how often the
	// mark is renewed (must be well below Duration).
	Duration, Renew time.Duration
	// Ready reports whether the agent is ready to terminate tunnels; the
	// mark is held only while it returns true.
	Ready func(context.Context) bool
	Log   *slog.Logger
}

// Mark holds this node's Lease while the agent is ready.
type Mark struct {
	cfg  MarkConfig
	held bool // only touched by Run
	// last is the Lease as this agent last wrote it (only touched by Run).
	// Renewals update it directly, as kubelet renews its node lease: one
	// request per renewal, and a Get only when the update conflicts (someone
	// else wrote the Lease) or finds it gone.
	last *coordinationv1.Lease
}

// NewMark checks cfg and returns a Mark.
func NewMark(cfg MarkConfig) (*Mark, error) {
	if cfg.Client == nil || cfg.Node == "" || cfg.Ready == nil || cfg.Log == nil {
		return nil, errors.New("creating the node mark: Client, Node, Ready and Log are required")
	}
	cfg.Namespace = cmp.Or(cfg.Namespace, DefaultNamespace)
	cfg.Holder = cmp.Or(cfg.Holder, cfg.Node)
	cfg.Duration = cmp.Or(cfg.Duration, DefaultLeaseDuration)
	cfg.Renew = cmp.Or(cfg.Renew, DefaultRenewInterval)
	if cfg.Duration < time.Second || cfg.Renew <= 0 || cfg.Renew*2 > cfg.Duration {
		return nil, fmt.Errorf("creating the node mark: renew interval %s must be at most half the lease duration %s (and the duration at least 1s)", cfg.Renew, cfg.Duration)
	}
	return &Mark{cfg: cfg}, nil
}

// Run holds the mark while Ready, renewing it every Renew, until ctx ends;
// then it withdraws the mark (deletes the Lease) and returns. API errors
// are logged and retried: a mark that cannot be renewed expires, which is
// the safe direction.
func (m *Mark) Run(ctx context.Context) error {
	// While the mark is not held, readiness is polled often, so peers
	// see a newly ready agent within a fraction of a second.
	const notHeldPoll = 200 * time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			wctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return m.withdraw(wctx)
		case <-t.C:
		}
		m.step(ctx)
		if m.held {
			t.Reset(m.cfg.Renew)
		} else {
			t.Reset(min(notHeldPoll, m.cfg.Renew))
		}
	}
}

func (m *Mark) step(ctx context.Context) {
	if !m.cfg.Ready(ctx) {
		if m.held {
			if err := m.withdraw(ctx); err != nil {
				m.cfg.Log.Warn("withdrawing the node mark (not ready)", "err", err)
			}
		}
		return
	}
	if err := m.renew(ctx); err != nil {
		if ctx.Err() == nil {
			m.cfg.Log.Warn("renewing the node mark; peers will treat this node as unmeshed once it expires", "lease", LeaseName(m.cfg.Node), "err", err)
		}
		return
	}
	if !m.held {
		m.cfg.Log.Info("node marked mesh-capable", "lease", m.cfg.Namespace+"/"+LeaseName(m.cfg.Node), "duration", m.cfg.Duration)
	}
	m.held = true
}

func (m *Mark) renew(ctx context.Context) error {
	leases := m.cfg.Client.Leases(m.cfg.Namespace)
	now := metav1.NewMicroTime(time.Now())
	name := LeaseName(m.cfg.Node)
	if m.last != nil {
		got, err := leases.Update(ctx, m.renewed(m.last.DeepCopy(), now), metav1.UpdateOptions{})
		if err == nil {
			m.last = got
			return nil
		}
		m.last = nil
		if !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			return fmt.Errorf("renewing lease %s/%s: %w", m.cfg.Namespace, name, err)
		}
		// Changed or deleted behind our back: read it again below.
	}
	cur, err := leases.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: m.cfg.Namespace, Labels: map[string]string{LabelNode: m.cfg.Node}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(m.cfg.Holder),
				LeaseDurationSeconds: ptr.To(int32(m.cfg.Duration / time.Second)), AcquireTime: &now, RenewTime: &now},
		}
		got, err := leases.Create(ctx, l, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("creating lease %s/%s: %w", m.cfg.Namespace, name, err)
		}
		m.last = got
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading lease %s/%s: %w", m.cfg.Namespace, name, err)
	}
	got, err := leases.Update(ctx, m.renewed(cur.DeepCopy(), now), metav1.UpdateOptions{})
	if err != nil {
		return fmt.Errorf("renewing lease %s/%s: %w", m.cfg.Namespace, name, err)
	}
	m.last = got
	return nil
}

// renewed sets l's holder, duration and renew time (and its acquire time
// when this agent did not hold it).
func (m *Mark) renewed(l *coordinationv1.Lease, now metav1.MicroTime) *coordinationv1.Lease {
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != m.cfg.Holder || !m.held {
		l.Spec.AcquireTime = &now
	}
	l.Spec.HolderIdentity = ptr.To(m.cfg.Holder)
	l.Spec.LeaseDurationSeconds = ptr.To(int32(m.cfg.Duration / time.Second))
	l.Spec.RenewTime = &now
	return l
}

// withdraw deletes the Lease. Not found is success.
func (m *Mark) withdraw(ctx context.Context) error {
	name := LeaseName(m.cfg.Node)
	err := m.cfg.Client.Leases(m.cfg.Namespace).Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("withdrawing the node mark (deleting lease %s/%s): %w", m.cfg.Namespace, name, err)
	}
	if m.held {
		m.cfg.Log.Info("node mark withdrawn", "lease", m.cfg.Namespace+"/"+name)
	}
	m.held = false
	m.last = nil
	return nil
}

// NodeStatus is one node's mark as peers see it.
type NodeStatus struct {
	Node      string    `json:"node"`
	Holder    string    `json:"holder,omitempty"`
	RenewTime time.Time `json:"renewTime,omitzero"`
	Duration  string    `json:"leaseDuration"`
	Fresh     bool      `json:"meshCapable"`
}

// Peers watches the marks of every node.
type Peers struct {
	informer cache.SharedIndexInformer
	ns       string
	now      func() time.Time
	mu       sync.Mutex
	synced   bool
}

// NewPeers watches the Leases in namespace ("" = DefaultNamespace).
func NewPeers(client apiclient.Interface, namespace string) *Peers {
	ns := cmp.Or(namespace, DefaultNamespace)
	return &Peers{informer: apiclient.NewInformer(client.Leases(ns), &coordinationv1.Lease{}, 0, nil), ns: ns, now: time.Now}
}

// Run watches until ctx ends.
func (p *Peers) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { p.informer.RunWithContext(ctx) })
	if !cache.WaitForCacheSync(ctx.Done(), p.informer.HasSynced) {
		return ctx.Err()
	}
	p.mu.Lock()
	p.synced = true
	p.mu.Unlock()
	<-ctx.Done()
	return nil
}

// Synced reports whether the first list has completed. Before that no node
// is mesh-capable.
func (p *Peers) Synced() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.synced
}

// Capable reports whether node's agent holds a fresh mark: it is ready to
// terminate HBONE tunnels. It does not block.
func (p *Peers) Capable(node string) bool {
	obj, ok, err := p.informer.GetStore().GetByKey(p.ns + "/" + LeaseName(node))
	if err != nil || !ok {
		return false
	}
	l, ok := obj.(*coordinationv1.Lease)
	return ok && fresh(l, p.now())
}

// Nodes lists the marks seen, sorted by node.
func (p *Peers) Nodes() []NodeStatus {
	now := p.now()
	var out []NodeStatus
	for _, o := range p.informer.GetStore().List() {
		l, ok := o.(*coordinationv1.Lease)
		if !ok || !strings.HasPrefix(l.Name, LeasePrefix) {
			continue
		}
		s := NodeStatus{Node: strings.TrimPrefix(l.Name, LeasePrefix), Fresh: fresh(l, now)}
		if l.Spec.HolderIdentity != nil {
			s.Holder = *l.Spec.HolderIdentity
		}
		if l.Spec.RenewTime != nil {
			s.RenewTime = l.Spec.RenewTime.Time
		}
		if l.Spec.LeaseDurationSeconds != nil {
			s.Duration = (time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second).String()
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b NodeStatus) int { return cmp.Compare(a.Node, b.Node) })
	return out
}

// fresh: held by someone, renewed, and not expired. Expiry compares the
// holder's renew time with the local clock, so nodes' clocks must agree to
// well within the lease duration (as for kubelet's node leases).
func fresh(l *coordinationv1.Lease, now time.Time) bool {
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "" || l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		return false
	}
	d := time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
	return d > 0 && now.Before(l.Spec.RenewTime.Add(d))
}
