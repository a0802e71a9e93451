package ca_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
)

// reviewer makes a fake clientset answer TokenReviews with status.
func reviewer(c *fake.Clientset, calls *atomic.Int32, status func(token string) (authnv1.TokenReviewStatus, error)) {
	c.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		calls.Add(1)
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview)
		st, err := status(tr.Spec.Token)
		if err != nil {
			return true, nil, err
		}
		tr = tr.DeepCopy()
		tr.Status = st
		return true, tr, nil
	})
}

const agentUser = "system:serviceaccount:nodemesh-system:nodemesh-agent"

// TestKubeAuthenticatorFallbacks covers what the real 1.34 API server in the
// lab tests does not: tokens without the node-name claim (older servers),
// where the CA looks the bound agent pod up; the review cache; an API
// server that cannot be reached.
func TestKubeAuthenticatorFallbacks(t *testing.T) {
	agent := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "agent-x", Namespace: "nodemesh-system", UID: "uid-1"}, Spec: corev1.PodSpec{NodeName: "node-x"}}
	c := fake.NewClientset(agent)
	var calls atomic.Int32
	reviewer(c, &calls, func(tok string) (authnv1.TokenReviewStatus, error) {
		extra := map[string]authnv1.ExtraValue{ca.ExtraPodName: {"agent-x"}, ca.ExtraPodUID: {"uid-1"}}
		switch tok {
		case "stale-uid":
			extra[ca.ExtraPodUID] = authnv1.ExtraValue{"uid-0"}
		case "down":
			return authnv1.TokenReviewStatus{}, errors.New("connection refused")
		case "wrong-aud":
			return authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"other"}, User: authnv1.UserInfo{Username: agentUser}}, nil
		}
		return authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{identity.Audience}, User: authnv1.UserInfo{Username: agentUser, Extra: extra}}, nil
	})
	now := time.Now()
	a, err := ca.NewKubeAuthenticator(ca.KubeAuthenticatorConfig{Client: c, AgentNamespace: "nodemesh-system", AgentServiceAccount: "nodemesh-agent",
		CacheTTL: 30 * time.Second, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	got, err := a.Authenticate(ctx, "good")
	if err != nil || got.Node != "node-x" || got.Pod != "nodemesh-system/agent-x" {
		t.Fatalf("pod fallback: %+v %v", got, err)
	}
	if _, err := a.Authenticate(ctx, "good"); err != nil || calls.Load() != 1 {
		t.Fatalf("second use of a token: %v, %d reviews (want 1, cached)", err, calls.Load())
	}
	now = now.Add(31 * time.Second)
	if _, err := a.Authenticate(ctx, "good"); err != nil || calls.Load() != 2 {
		t.Fatalf("after the cache TTL: %v, %d reviews (want 2)", err, calls.Load())
	}
	for tok, code := range map[string]identity.Code{
		"stale-uid": identity.CodeTokenInvalid,
		"down":      identity.CodeUnavailable,
		"wrong-aud": identity.CodeTokenAudience,
		"":          identity.CodeUnauthenticated,
	} {
		_, err := a.Authenticate(ctx, tok)
		var ref *ca.Refusal
		if !errors.As(err, &ref) || ref.Code != code {
			t.Errorf("token %q: %v, want %s", tok, err, code)
		}
	}
	if _, err := ca.NewKubeAuthenticator(ca.KubeAuthenticatorConfig{Client: c}); err == nil {
		t.Error("authenticator without an agent service account")
	}
}
