package k8s_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/identity/ca"
	"github.com/nodemesh/nodemesh/identity/k8s"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

func FuzzParseBundle(f *testing.F) {
	root, err := ca.NewRootSigner(td, time.Hour, time.Now())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(ca.EncodeCerts([]*x509.Certificate{root.Cert}))
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		roots, err := k8s.ParseBundle(b)
		if err == nil {
			if len(roots) == 0 {
				t.Fatal("no error and no roots")
			}
			for _, r := range roots {
				if !r.IsCA {
					t.Fatal("accepted a non-CA certificate")
				}
			}
		}
	})
}

// recorder is a Wanter that records the wanted set.
type recorder struct {
	mu  sync.Mutex
	ids map[string]spiffeid.ID
}

func (r *recorder) Add(owner string, id spiffeid.ID) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids[owner] = id
	return nil
}

func (r *recorder) Remove(owner string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.ids, owner)
}

func (r *recorder) get() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]string{}
	for k, v := range r.ids {
		out[k] = v.String()
	}
	return out
}

// TestPodWatcherWantedSet checks which pods get identities, with a fake
// clientset (the lab test runs the same against the real API server).
func TestPodWatcherWantedSet(t *testing.T) {
	mkPod := func(uid, ns, sa string, phase corev1.PodPhase, hostNet bool) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: uid, Namespace: ns, UID: types.UID(uid)},
			Spec:       corev1.PodSpec{NodeName: "n1", ServiceAccountName: sa, HostNetwork: hostNet},
			Status:     corev1.PodStatus{Phase: phase},
		}
	}
	c := fake.NewClientset(
		mkPod("web", "app", "web", corev1.PodRunning, false),
		mkPod("dflt", "app", "", corev1.PodRunning, false),
		mkPod("pending", "app", "api", corev1.PodPending, false),
		mkPod("host", "kube-system", "proxy", corev1.PodRunning, true),
		mkPod("optout", "app", "batch", corev1.PodRunning, false),
	)
	r := &recorder{ids: map[string]spiffeid.ID{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- k8s.RunPodWatcher(ctx, k8s.PodWatcherConfig{
			Client: apiclienttest.FromClientset(c), Node: "n1", TrustDomain: td, Target: r, Log: slog.New(slog.DiscardHandler),
			Filter: func(p *corev1.Pod) bool { return p.Name != "optout" },
		})
	}()
	defer func() { cancel(); <-done }()
	want := map[string]string{"web": "spiffe://cluster.local/ns/app/sa/web", "dflt": "spiffe://cluster.local/ns/app/sa/default"}
	waitfor.NoError(t, 10*time.Second, "wanted set", func() error {
		if got := r.get(); !equal(got, want) {
			return errorf("got %v want %v", got, want)
		}
		return nil
	})
	if err := c.CoreV1().Pods("app").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	delete(want, "web")
	waitfor.NoError(t, 10*time.Second, "web removed", func() error {
		if got := r.get(); !equal(got, want) {
			return errorf("got %v want %v", got, want)
		}
		return nil
	})
	if err := k8s.RunPodWatcher(ctx, k8s.PodWatcherConfig{Client: apiclienttest.FromClientset(c), TrustDomain: td, Target: r, Log: slog.New(slog.DiscardHandler)}); err == nil || !strings.Contains(err.Error(), "NODE_NAME") {
		t.Fatalf("empty node: %v", err)
	}
}

func equal(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func errorf(format string, args ...any) error { return fmt.Errorf(format, args...) }
