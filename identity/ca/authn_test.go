package ca_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
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

// jwt is a JWT-shaped token named name (the CA reads its claims without
// verifying them; TokenReview decides). exp 0: no exp claim.
func jwt(name string, exp int64, aud ...string) string {
	if aud == nil {
		aud = []string{identity.Audience}
	}
	claims, _ := json.Marshal(map[string]any{"jti": name, "exp": exp, "aud": aud})
	if exp == 0 {
		claims, _ = json.Marshal(map[string]any{"jti": name, "aud": aud})
	}
	return "e30." + base64.RawURLEncoding.EncodeToString(claims) + ".sig"
}

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
		case jwt("stale-uid", 0):
			extra[ca.ExtraPodUID] = authnv1.ExtraValue{"uid-0"}
		case jwt("down", 0):
			return authnv1.TokenReviewStatus{}, errors.New("connection refused")
		case jwt("wrong-aud", 0):
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
	good := jwt("good", 0)
	got, err := a.Authenticate(ctx, good)
	if err != nil || got.Node != "node-x" || got.Pod != "nodemesh-system/agent-x" {
		t.Fatalf("pod fallback: %+v %v", got, err)
	}
	if _, err := a.Authenticate(ctx, good); err != nil || calls.Load() != 1 {
		t.Fatalf("second use of a token: %v, %d reviews (want 1, cached)", err, calls.Load())
	}
	now = now.Add(31 * time.Second)
	if _, err := a.Authenticate(ctx, good); err != nil || calls.Load() != 2 {
		t.Fatalf("after the cache TTL: %v, %d reviews (want 2)", err, calls.Load())
	}
	for tok, code := range map[string]identity.Code{
		jwt("stale-uid", 0): identity.CodeTokenInvalid,
		jwt("down", 0):      identity.CodeUnavailable,
		jwt("wrong-aud", 0): identity.CodeTokenAudience,
		"":                  identity.CodeUnauthenticated,
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

// TestKubeAuthenticatorBoundsReviews checks what keeps bad tokens from
// costing the API server: tokens refused on their face (not a JWT,
// expired, another audience) cost no TokenReview; a rejected token is
// cached for NegativeCacheTTL; concurrent reviews are bounded.
func TestKubeAuthenticatorBoundsReviews(t *testing.T) {
	c := fake.NewClientset()
	var calls atomic.Int32
	block := make(chan struct{})
	entered := make(chan struct{}, 1)
	reviewer(c, &calls, func(tok string) (authnv1.TokenReviewStatus, error) {
		if tok == jwt("slow", 0) {
			entered <- struct{}{}
			<-block
		}
		return authnv1.TokenReviewStatus{Authenticated: false, Error: "invalid signature"}, nil
	})
	now := time.Now()
	m := ca.NewMetrics(nil)
	a, err := ca.NewKubeAuthenticator(ca.KubeAuthenticatorConfig{Client: c, AgentNamespace: "nodemesh-system", AgentServiceAccount: "nodemesh-agent",
		NegativeCacheTTL: 30 * time.Second, MaxReviews: 1, Metrics: m, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	code := func(tok string) identity.Code {
		_, err := a.Authenticate(ctx, tok)
		var ref *ca.Refusal
		if !errors.As(err, &ref) {
			t.Fatalf("token %.20q: %v, want a refusal", tok, err)
		}
		return ref.Code
	}
	for tok, want := range map[string]identity.Code{
		"not-a-jwt":                            identity.CodeTokenInvalid,
		jwt("old", now.Add(-time.Hour).Unix()): identity.CodeTokenExpired,
		jwt("aud", 0, "kubernetes"):            identity.CodeTokenAudience,
	} {
		if got := code(tok); got != want {
			t.Errorf("token %.20q: %s, want %s", tok, got, want)
		}
	}
	if calls.Load() != 0 {
		t.Fatalf("%d TokenReviews for tokens refused on their face, want 0", calls.Load())
	}
	forged := jwt("forged", 0)
	for range 5 {
		if got := code(forged); got != identity.CodeTokenInvalid {
			t.Fatalf("forged token: %s", got)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("%d TokenReviews for one forged token sent 5 times, want 1 (negative cache)", calls.Load())
	}
	now = now.Add(31 * time.Second)
	code(forged)
	if calls.Load() != 2 {
		t.Fatalf("%d TokenReviews after the negative cache TTL, want 2", calls.Load())
	}

	done := make(chan identity.Code)
	go func() { done <- code(jwt("slow", 0)) }()
	<-entered
	_, err = a.Authenticate(ctx, jwt("other", 0))
	var ref *ca.Refusal
	if !errors.As(err, &ref) || ref.Code != identity.CodeUnavailable || ref.Limit != ca.LimitTokenReviews {
		t.Errorf("second concurrent review with MaxReviews 1: %v, want unavailable (limit %s)", err, ca.LimitTokenReviews)
	}
	close(block)
	if got := <-done; got != identity.CodeTokenInvalid {
		t.Errorf("slow review: %s", got)
	}
	if m.Reviews("rejected") != 3 {
		t.Errorf("rejected reviews %v, want 3", m.Reviews("rejected"))
	}
}
