package rollout

import (
	"context"
	"log/slog"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// TestLabMark runs the mark and the peers' view against the real
// kube-apiserver: a ready agent's mark is seen, a withdrawn one disappears
// at once, and a mark whose holder vanished without withdrawing (SIGKILL)
// stops counting within its lease duration.
func TestLabMark(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := labtest.APIServer(ctx, t)
	c := srv.Client
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: DefaultNamespace}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	api := apiclienttest.New(t, srv.REST)
	peers := NewPeers(api, "")
	pctx, stopPeers := context.WithCancel(ctx)
	pdone := make(chan error, 1)
	go func() { pdone <- peers.Run(pctx) }()
	defer func() { stopPeers(); <-pdone }()

	m, err := NewMark(MarkConfig{Client: api, Node: "node-a", Holder: "nodemesh-agent-xyz", Duration: 4 * time.Second, Renew: time.Second,
		Ready: func(context.Context) bool { return true }, Log: slog.Default()})
	if err != nil {
		t.Fatal(err)
	}
	mctx, stopMark := context.WithCancel(ctx)
	mdone := make(chan error, 1)
	go func() { mdone <- m.Run(mctx) }()
	waitfor.True(t, 30*time.Second, "node-a capable", func() bool { return peers.Capable("node-a") })
	// Renewals keep it capable past the lease duration: wait until the
	// peers' view holds a renewal made after the first lease would have
	// expired (a sleep would prove nothing on a machine too slow to renew).
	first := time.Now()
	waitfor.True(t, 30*time.Second, "a renewal after the first lease duration", func() bool {
		l, err := c.CoordinationV1().Leases(DefaultNamespace).Get(ctx, LeaseName("node-a"), metav1.GetOptions{})
		return err == nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.After(first.Add(4*time.Second))
	})
	if !peers.Capable("node-a") {
		t.Fatal("a renewed mark expired")
	}
	stopMark()
	if err := <-mdone; err != nil {
		t.Fatal(err)
	}
	waitfor.True(t, 30*time.Second, "node-a withdrawn", func() bool { return !peers.Capable("node-a") })
	if _, err := c.CoordinationV1().Leases(DefaultNamespace).Get(ctx, LeaseName("node-a"), metav1.GetOptions{}); err == nil {
		t.Error("lease still exists after withdrawal")
	}

	// A holder that stopped renewing without withdrawing.
	now := metav1.NewMicroTime(time.Now())
	_, err = c.CoordinationV1().Leases(DefaultNamespace).Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: LeaseName("node-b")},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: ptr.To("killed"), LeaseDurationSeconds: ptr.To(int32(3)), RenewTime: &now},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitfor.True(t, 30*time.Second, "node-b capable", func() bool { return peers.Capable("node-b") })
	start := time.Now()
	waitfor.True(t, 30*time.Second, "node-b stale", func() bool { return !peers.Capable("node-b") })
	if d := time.Since(now.Time); d < 3*time.Second {
		t.Fatalf("node-b went stale after %s, before its 3s lease duration", d)
	}
	t.Logf("stale mark recognised %s after the last renewal (waited %s)", time.Since(now.Time).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}
