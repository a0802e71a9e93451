package rollout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

func lease(holder string, renew time.Time, secs int32) *coordinationv1.Lease {
	l := &coordinationv1.Lease{}
	if holder != "" {
		l.Spec.HolderIdentity = ptr.To(holder)
	}
	if !renew.IsZero() {
		l.Spec.RenewTime = ptr.To(metav1.NewMicroTime(renew))
	}
	if secs >= 0 {
		l.Spec.LeaseDurationSeconds = ptr.To(secs)
	}
	return l
}

func TestFresh(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name string
		l    *coordinationv1.Lease
		want bool
	}{
		{"renewed just now", lease("n1", now, 10), true},
		{"renewed 9s ago", lease("n1", now.Add(-9*time.Second), 10), true},
		{"expired", lease("n1", now.Add(-11*time.Second), 10), false},
		{"no holder", lease("", now, 10), false},
		{"never renewed", lease("n1", time.Time{}, 10), false},
		{"no duration", lease("n1", now, -1), false},
		{"zero duration", lease("n1", now, 0), false},
	} {
		if got := fresh(tc.l, now); got != tc.want {
			t.Errorf("%s: fresh = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestNewMarkRejectsBadConfig(t *testing.T) {
	c := fake.NewClientset()
	ready := func(context.Context) bool { return true }
	if _, err := NewMark(MarkConfig{Client: apiclienttest.FromClientset(c), Ready: ready, Log: slog.Default()}); err == nil {
		t.Error("no node: want an error")
	}
	if _, err := NewMark(MarkConfig{Client: apiclienttest.FromClientset(c), Node: "n", Ready: ready, Log: slog.Default(), Duration: 4 * time.Second, Renew: 3 * time.Second}); err == nil {
		t.Error("renew > duration/2: want an error")
	}
}

// getLease returns the node's lease or nil.
func getLease(t *testing.T, c kubernetes.Interface, node string) *coordinationv1.Lease {
	t.Helper()
	l, err := c.CoordinationV1().Leases(DefaultNamespace).Get(context.Background(), LeaseName(node), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestMarkFollowsReadiness: held while ready, withdrawn when not, and
// deleted when Run ends; Peers see each state.
func TestMarkFollowsReadiness(t *testing.T) {
	c := fake.NewClientset()
	var ready atomic.Bool
	m, err := NewMark(MarkConfig{Client: apiclienttest.FromClientset(c), Node: "n1", Holder: "agent-abc", Duration: 2 * time.Second, Renew: 50 * time.Millisecond,
		Ready: func(context.Context) bool { return ready.Load() }, Log: slog.Default()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	peers := NewPeers(apiclienttest.FromClientset(c), "")
	pdone := make(chan error, 1)
	go func() { pdone <- peers.Run(ctx) }()
	defer func() { cancel(); <-pdone }()
	mctx, stopMark := context.WithCancel(ctx)
	mdone := make(chan error, 1)
	go func() { mdone <- m.Run(mctx) }()

	time.Sleep(200 * time.Millisecond)
	if l := getLease(t, c, "n1"); l != nil {
		t.Fatalf("lease exists while the agent is not ready: %+v", l.Spec)
	}
	if peers.Capable("n1") {
		t.Fatal("n1 capable before it was ready")
	}
	ready.Store(true)
	waitfor.True(t, 30*time.Second, "the lease", func() bool { return getLease(t, c, "n1") != nil })
	l := getLease(t, c, "n1")
	if *l.Spec.HolderIdentity != "agent-abc" || *l.Spec.LeaseDurationSeconds != 2 || l.Labels[LabelNode] != "n1" {
		t.Fatalf("lease = %+v %+v", l.Labels, l.Spec)
	}
	first := l.Spec.RenewTime.Time
	waitfor.True(t, 30*time.Second, "a renewal", func() bool { return getLease(t, c, "n1").Spec.RenewTime.After(first) })
	waitfor.True(t, 30*time.Second, "peers to see n1", func() bool { return peers.Capable("n1") })
	if peers.Capable("n2") {
		t.Error("n2 has no mark but is capable")
	}
	if ns := peers.Nodes(); len(ns) != 1 || ns[0].Node != "n1" || !ns[0].Fresh || ns[0].Holder != "agent-abc" {
		t.Errorf("Nodes() = %+v", ns)
	}

	ready.Store(false)
	waitfor.True(t, 30*time.Second, "withdrawal when not ready", func() bool { return getLease(t, c, "n1") == nil })
	waitfor.True(t, 30*time.Second, "peers to drop n1", func() bool { return !peers.Capable("n1") })
	ready.Store(true)
	waitfor.True(t, 30*time.Second, "the lease again", func() bool { return getLease(t, c, "n1") != nil })
	stopMark()
	if err := <-mdone; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if l := getLease(t, c, "n1"); l != nil {
		t.Fatal("lease left behind after Run ended")
	}
}

// TestPeersStaleLease: a mark that is no longer renewed stops counting
// once its duration has passed, with no event from the API server.
func TestPeersStaleLease(t *testing.T) {
	now := time.Now()
	l := lease("ghost", now, 10)
	l.Name, l.Namespace = LeaseName("n3"), DefaultNamespace
	c := fake.NewClientset(l)
	peers := NewPeers(apiclienttest.FromClientset(c), "")
	clock := now
	peers.now = func() time.Time { return clock }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- peers.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitfor.True(t, 30*time.Second, "sync", peers.Synced)
	if !peers.Capable("n3") {
		t.Fatal("fresh lease not capable")
	}
	clock = now.Add(11 * time.Second)
	if peers.Capable("n3") {
		t.Fatal("expired lease still capable")
	}
	if ns := peers.Nodes(); len(ns) != 1 || ns[0].Fresh {
		t.Errorf("Nodes() = %+v", ns)
	}
}

// TestMarkRenewsWithOneRequest: after the first write, each renewal is one
// Update of the Lease as last written (kubelet's way), not a Get and an
// Update; a conflict (someone else wrote the Lease) or a Lease deleted
// behind the agent's back costs one Get, then renewals are single Updates
// again.
func TestMarkRenewsWithOneRequest(t *testing.T) {
	c := fake.NewClientset()
	m, err := NewMark(MarkConfig{Client: apiclienttest.FromClientset(c), Node: "n1", Ready: func(context.Context) bool { return true }, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	verbs := func() []string {
		var out []string
		for _, a := range c.Actions() {
			if a.GetResource().Resource == "leases" {
				out = append(out, a.GetVerb())
			}
		}
		c.ClearActions()
		return out
	}
	expect := func(what string, want ...string) {
		t.Helper()
		if got := verbs(); !slices.Equal(got, want) {
			t.Fatalf("%s: requests %v, want %v", what, got, want)
		}
		if !m.held {
			t.Fatalf("%s: mark not held", what)
		}
	}
	m.step(ctx)
	expect("first mark", "get", "create")
	first := getLease(t, c, "n1")
	verbs()
	for i := range 3 {
		m.step(ctx)
		expect(fmt.Sprintf("renewal %d", i), "update")
	}
	if l := getLease(t, c, "n1"); l.Spec.RenewTime.Before(first.Spec.RenewTime) ||
		!l.Spec.AcquireTime.Equal(first.Spec.AcquireTime) || *l.Spec.HolderIdentity != "n1" {
		t.Fatalf("renewed lease %+v, first %+v", l.Spec, first.Spec)
	}
	verbs()

	// Someone else wrote the Lease: the update conflicts, the agent reads
	// it again and takes it back.
	conflicts := 1
	c.PrependReactor("update", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		if conflicts > 0 {
			conflicts--
			return true, nil, apierrors.NewConflict(coordinationv1.Resource("leases"), LeaseName("n1"), errors.New("modified"))
		}
		return false, nil, nil
	})
	m.step(ctx)
	expect("after a conflict", "update", "get", "update")
	m.step(ctx)
	expect("renewal after the conflict", "update")

	// Deleted behind the agent's back: recreated.
	if err := c.CoordinationV1().Leases(DefaultNamespace).Delete(ctx, LeaseName("n1"), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	verbs()
	m.step(ctx)
	expect("after a deletion", "update", "get", "create")
	if getLease(t, c, "n1") == nil {
		t.Fatal("lease not recreated")
	}
}
