package apiserver_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/privtest"
)

// TestLabAPIServer starts the real API server and checks what the lab and
// the identity tests rely on: object round trips through etcd, ClusterIP
// allocation, and service-account tokens that TokenReview accepts for the
// requested audience only.
func TestLabAPIServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bin, err := apiserver.Binary(ctx)
	if err != nil {
		privtest.Skip(t, "kube-apiserver unavailable: "+err.Error())
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		privtest.Skip(t, "etcd not installed (apt-get install etcd-server)")
	}
	dir := t.TempDir()
	s, err := apiserver.Start(ctx, apiserver.Config{Dir: dir, Binary: bin})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	c := s.Client

	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating a namespace: %v", err)
	}
	if _, err := c.CoreV1().ServiceAccounts("demo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "agent"}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating a service account: %v", err)
	}
	svc, err := c.CoreV1().Services("demo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}, Selector: map[string]string{"app": "web"}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating a service: %v", err)
	}
	if !strings.HasPrefix(svc.Spec.ClusterIP, "10.96.") {
		t.Errorf("ClusterIP %q not allocated from %s", svc.Spec.ClusterIP, s.ServiceCIDR)
	}

	tr, err := c.CoreV1().ServiceAccounts("demo").CreateToken(ctx, "agent", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{Audiences: []string{"nodemesh-ca"}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest: %v", err)
	}
	review := func(aud string) *authenticationv1.TokenReview {
		r, err := c.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: tr.Status.Token, Audiences: []string{aud}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("TokenReview: %v", err)
		}
		return r
	}
	if r := review("nodemesh-ca"); !r.Status.Authenticated || r.Status.User.Username != "system:serviceaccount:demo:agent" {
		t.Errorf("TokenReview for the right audience: authenticated=%v user=%q err=%q", r.Status.Authenticated, r.Status.User.Username, r.Status.Error)
	}
	if r := review("someone-else"); r.Status.Authenticated {
		t.Errorf("TokenReview accepted a token for the wrong audience")
	}

	// The token authenticates against the API server itself only for its
	// audience; an unauthorised caller is refused by RBAC, not let in.
	sa, err := kubernetes.NewForConfig(s.ClientFor("not-a-token"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sa.CoreV1().Pods("demo").List(ctx, metav1.ListOptions{}); err == nil {
		t.Errorf("listing pods with a bogus token succeeded")
	}

	// Another process can attach with Load.
	l, err := apiserver.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Client.CoreV1().Services("demo").Get(ctx, "web", metav1.GetOptions{}); err != nil {
		t.Errorf("Load: reading back the service: %v", err)
	}

	// Stop ends both processes and removes their pid files.
	pids := readPids(t, dir)
	if err := s.Stop(); err != nil {
		t.Errorf("Stop: %v", err)
	}
	for name, pid := range pids {
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("%s (pid %d) still running after Stop", name, pid)
		}
	}
}

func readPids(t *testing.T, dir string) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, name := range []string{"etcd", "kube-apiserver"} {
		b, err := os.ReadFile(filepath.Join(dir, name+".pid"))
		if err != nil {
			t.Fatalf("pid file for %s: %v", name, err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		out[name] = pid
	}
	return out
}
