package ca

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"

	"github.com/nodemesh/nodemesh/identity"
)

// Caller is an authenticated agent and the node its token is bound to.
type Caller struct {
	User string // e.g. system:serviceaccount:nodemesh-system:nodemesh-agent
	Node string // the node the token is bound to (never empty on success)
	Pod  string // namespace/name of the agent pod the token is bound to, if any
}

// Authenticator verifies a bearer token. It returns a *Refusal when the
// token is not an agent token bound to a node.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (Caller, error)
}

// PodFinder looks for a running or starting (Pending) pod of workload w
// scheduled on node. It returns the pod's name, "" when there is none, or an error when it cannot
// tell (the CA then refuses with CodeUnavailable: fail closed).
type PodFinder interface {
	RunningPod(ctx context.Context, node string, w identity.Workload) (string, error)
}

// Keys of TokenReview status.user.extra set for tokens bound to a pod
// (Kubernetes 1.30+ with ServiceAccountTokenPodNodeInfo, GA in 1.32).
const (
	ExtraNodeName = "authentication.kubernetes.io/node-name"
	ExtraPodName  = "authentication.kubernetes.io/pod-name"
	ExtraPodUID   = "authentication.kubernetes.io/pod-uid"
)

// KubeAuthenticatorConfig configures a KubeAuthenticator.
type KubeAuthenticatorConfig struct {
	Client kubernetes.Interface
	// AgentNamespace/AgentServiceAccount name the only service account whose
	// tokens may request SVIDs.
	AgentNamespace, AgentServiceAccount string
	// Audience the tokens must carry; default identity.Audience.
	Audience string
	// CacheSize and CacheTTL bound the cache of successful reviews, keyed by
	// the token's SHA-256 (the token itself is never stored). Defaults 4096
	// and 30s. A cached entry never outlives the token's exp.
	CacheSize int
	CacheTTL  time.Duration
	// NegativeCacheSize and NegativeCacheTTL bound the cache of refused
	// tokens, so that repeating a bad token costs no TokenReview; defaults
	// 4096 and 30s. Only refusals that no retry can change are cached
	// (never CodeUnavailable).
	NegativeCacheSize int
	NegativeCacheTTL  time.Duration
	// MaxReviews bounds concurrent TokenReviews; default 16. Beyond it a
	// request is refused with CodeUnavailable (LimitTokenReviews) at once.
	// Cached tokens need no review, so agents that already authenticated
	// are not held up by callers flooding the CA with fresh bad tokens.
	MaxReviews int
	// Metrics receives review and cache counters; nil: none.
	Metrics *Metrics
	Now     func() time.Time
}

// KubeAuthenticator authenticates agents with the TokenReview API.
type KubeAuthenticator struct {
	cfg  KubeAuthenticatorConfig
	user string
	// cache is a plain LRU with expiry checked on read: golang-lru's
	// expirable LRU runs a goroutine that can never be stopped.
	cache *lru.Cache[[sha256.Size]byte, cachedCaller]
	// refused caches refusals the same way.
	refused *lru.Cache[[sha256.Size]byte, cachedRefusal]
	reviews chan struct{}
}

type cachedRefusal struct {
	c   Caller // who the token belongs to, if the review said (for the audit log)
	ref *Refusal
	exp time.Time
}

// clockSkew is how far the CA's clock may be behind the API server's
// before a token it reads as expired is refused without a review.
const clockSkew = 5 * time.Minute

type cachedCaller struct {
	c   Caller
	exp time.Time // min(review time + CacheTTL, token exp)
}

// NewKubeAuthenticator validates cfg.
func NewKubeAuthenticator(cfg KubeAuthenticatorConfig) (*KubeAuthenticator, error) {
	if cfg.Client == nil {
		return nil, fmt.Errorf("creating TokenReview authenticator: no Kubernetes client")
	}
	if cfg.AgentNamespace == "" || cfg.AgentServiceAccount == "" {
		return nil, fmt.Errorf("creating TokenReview authenticator: agent service account namespace/name not set")
	}
	if cfg.Audience == "" {
		cfg.Audience = identity.Audience
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = 4096
	}
	if cfg.CacheTTL <= 0 {
		cfg.CacheTTL = 30 * time.Second
	}
	if cfg.NegativeCacheSize <= 0 {
		cfg.NegativeCacheSize = 4096
	}
	if cfg.NegativeCacheTTL <= 0 {
		cfg.NegativeCacheTTL = 30 * time.Second
	}
	if cfg.MaxReviews <= 0 {
		cfg.MaxReviews = 16
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cache, err := lru.New[[sha256.Size]byte, cachedCaller](cfg.CacheSize)
	if err != nil {
		return nil, fmt.Errorf("creating TokenReview cache: %w", err)
	}
	refused, err := lru.New[[sha256.Size]byte, cachedRefusal](cfg.NegativeCacheSize)
	if err != nil {
		return nil, fmt.Errorf("creating TokenReview negative cache: %w", err)
	}
	return &KubeAuthenticator{
		cfg:     cfg,
		user:    "system:serviceaccount:" + cfg.AgentNamespace + ":" + cfg.AgentServiceAccount,
		cache:   cache,
		refused: refused,
		reviews: make(chan struct{}, cfg.MaxReviews),
	}, nil
}

// Authenticate implements Authenticator.
func (k *KubeAuthenticator) Authenticate(ctx context.Context, token string) (Caller, error) {
	if token == "" {
		return Caller{}, refuse(identity.CodeUnauthenticated, "no bearer token; send the agent's projected service-account token (audience %s) as Authorization: Bearer", k.cfg.Audience)
	}
	now := k.cfg.Now()
	key := sha256.Sum256([]byte(token))
	if c, ok := k.cache.Get(key); ok {
		if now.Before(c.exp) {
			return c.c, nil
		}
		k.cache.Remove(key)
	}
	if r, ok := k.refused.Get(key); ok {
		if now.Before(r.exp) {
			k.cfg.Metrics.cache.WithLabelValues("negative_hit").Inc()
			return r.c, r.ref
		}
		k.refused.Remove(key)
	}
	claims := peekClaims(token)
	// Refuse what cannot be a usable agent token on its face without a
	// TokenReview: agents always send a projected token, a JWT.
	if ref := precheck(claims, now, k.cfg.Audience); ref != nil {
		k.cfg.Metrics.cache.WithLabelValues("precheck").Inc()
		return Caller{}, ref
	}
	select {
	case k.reviews <- struct{}{}:
	default:
		return Caller{}, &Refusal{Code: identity.CodeUnavailable, Limit: LimitTokenReviews,
			Msg: fmt.Sprintf("the CA is reviewing %d tokens already; retry with backoff", cap(k.reviews))}
	}
	c, ref := k.review(ctx, token, claims, now)
	<-k.reviews
	if ref != nil {
		if ref.Code == identity.CodeUnavailable {
			k.cfg.Metrics.reviews.WithLabelValues("error").Inc()
		} else {
			k.cfg.Metrics.reviews.WithLabelValues("rejected").Inc()
			k.refused.Add(key, cachedRefusal{c: c, ref: ref, exp: now.Add(k.cfg.NegativeCacheTTL)})
		}
		return c, ref
	}
	k.cfg.Metrics.reviews.WithLabelValues("authenticated").Inc()
	exp := now.Add(k.cfg.CacheTTL)
	if claims.exp > 0 && time.Unix(claims.exp, 0).Before(exp) {
		exp = time.Unix(claims.exp, 0)
	}
	k.cache.Add(key, cachedCaller{c: c, exp: exp})
	return c, nil
}

// precheck refuses a token whose unverified claims already rule it out:
// not a JWT, expired (by more than clockSkew), or minted for another
// audience. It returns nil when only a TokenReview can tell.
func precheck(claims tokenClaims, now time.Time, audience string) *Refusal {
	switch {
	case !claims.ok:
		return refuse(identity.CodeTokenInvalid, "the bearer token is not a JWT; send the agent's projected service-account token (audience %s)", audience)
	case claims.exp > 0 && now.Unix() >= claims.exp+int64(clockSkew/time.Second):
		return refuse(identity.CodeTokenExpired, "token expired at %s; re-read the projected token file before each request (the kubelet refreshes it)", time.Unix(claims.exp, 0).UTC().Format(time.RFC3339))
	case claims.aud != nil && !slices.Contains(claims.aud, audience):
		return refuse(identity.CodeTokenAudience, "token audiences %q do not include %q; project the token with audience %q", claims.aud, audience, audience)
	}
	return nil
}

// review asks the API server about token and checks the answer.
func (k *KubeAuthenticator) review(ctx context.Context, token string, claims tokenClaims, now time.Time) (Caller, *Refusal) {
	tr, err := k.cfg.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{k.cfg.Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return Caller{}, &Refusal{Code: identity.CodeUnavailable, Msg: "cannot review the token with the Kubernetes API server now; retry later", Err: err}
	}
	st := tr.Status
	if !st.Authenticated {
		switch {
		case claims.ok && claims.exp > 0 && now.Unix() >= claims.exp:
			return Caller{}, refuse(identity.CodeTokenExpired, "token expired at %s; re-read the projected token file before each request (the kubelet refreshes it)", time.Unix(claims.exp, 0).UTC().Format(time.RFC3339))
		case claims.ok && !slices.Contains(claims.aud, k.cfg.Audience):
			return Caller{}, refuse(identity.CodeTokenAudience, "token audiences %q do not include %q; project the token with audience %q", claims.aud, k.cfg.Audience, k.cfg.Audience)
		}
		reason := st.Error
		if reason == "" {
			reason = "not authenticated"
		}
		return Caller{}, refuse(identity.CodeTokenInvalid, "the API server rejected the token (forged, revoked, or its pod is gone): %s", reason)
	}
	if len(st.Audiences) > 0 && !slices.Contains(st.Audiences, k.cfg.Audience) {
		return Caller{}, refuse(identity.CodeTokenAudience, "token is valid for audiences %q, not %q", st.Audiences, k.cfg.Audience)
	}
	if st.User.Username != k.user {
		return Caller{User: st.User.Username}, refuse(identity.CodeNotAgent, "token belongs to %q; only the agent service account %s/%s may request SVIDs", st.User.Username, k.cfg.AgentNamespace, k.cfg.AgentServiceAccount)
	}
	c := Caller{User: st.User.Username, Node: first(st.User.Extra[ExtraNodeName])}
	if pod := first(st.User.Extra[ExtraPodName]); pod != "" {
		c.Pod = k.cfg.AgentNamespace + "/" + pod
		if c.Node == "" {
			// Older API servers bind the pod but do not put its node in the
			// token: look the pod up, and make sure it is the same pod.
			p, err := k.cfg.Client.CoreV1().Pods(k.cfg.AgentNamespace).Get(ctx, pod, metav1.GetOptions{})
			if err != nil {
				return Caller{}, &Refusal{Code: identity.CodeUnavailable, Msg: fmt.Sprintf("cannot look up the agent pod %s the token is bound to", c.Pod), Err: err}
			}
			if uid := first(st.User.Extra[ExtraPodUID]); uid != "" && uid != string(p.UID) {
				return Caller{}, refuse(identity.CodeTokenInvalid, "token is bound to pod %s uid %s, which no longer exists (now uid %s)", c.Pod, uid, p.UID)
			}
			c.Node = p.Spec.NodeName
		}
	}
	if c.Node == "" {
		return c, refuse(identity.CodeTokenNotBound, "token is bound to no node or scheduled pod; use a projected service-account token (bound to the agent pod) rather than a long-lived secret token")
	}
	return c, nil
}

func first(v authnv1.ExtraValue) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// tokenClaims are a JWT's claims read WITHOUT verifying the signature. They
// only make refusal messages precise; TokenReview decides.
type tokenClaims struct {
	ok  bool
	exp int64
	aud []string
}

func peekClaims(token string) tokenClaims {
	parts := strings.Split(token, ".")
	if len(parts) != 3 || len(parts[1]) > 16<<10 {
		return tokenClaims{}
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return tokenClaims{}
	}
	var c struct {
		Exp json.Number     `json:"exp"`
		Aud json.RawMessage `json:"aud"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return tokenClaims{}
	}
	out := tokenClaims{ok: true}
	if e, err := c.Exp.Int64(); err == nil {
		out.exp = e
	}
	var one string
	if json.Unmarshal(c.Aud, &one) == nil {
		out.aud = []string{one}
	} else {
		_ = json.Unmarshal(c.Aud, &out.aud)
	}
	return out
}

// KubePods finds pods with the API server (a consistent list, so a pod
// scheduled a moment ago is found and a deleted one is not).
type KubePods struct{ Client kubernetes.Interface }

// RunningPod implements PodFinder. A Pending pod counts: it is bound to
// the node, whose kubelet is starting it (Kubernetes' node authorizer
// trusts a node with its bound pods alike), and the nodemesh CNI plugin
// enrolls pods, and so wants their SVIDs, before they run.
func (k KubePods) RunningPod(ctx context.Context, node string, w identity.Workload) (string, error) {
	sel := fields.AndSelectors(fields.Set{
		"spec.nodeName":           node,
		"spec.serviceAccountName": w.ServiceAccount,
	}.AsSelector(),
		fields.OneTermNotEqualSelector("status.phase", string(corev1.PodSucceeded)),
		fields.OneTermNotEqualSelector("status.phase", string(corev1.PodFailed))).String()
	pods, err := k.Client.CoreV1().Pods(w.Namespace).List(ctx, metav1.ListOptions{FieldSelector: sel})
	if err != nil {
		return "", fmt.Errorf("listing pods of %s on node %s: %w", w, node, err)
	}
	for _, p := range pods.Items {
		// Re-check what the selector promised, and skip terminating pods.
		if p.Spec.NodeName == node && p.Spec.ServiceAccountName == w.ServiceAccount &&
			(p.Status.Phase == corev1.PodRunning || p.Status.Phase == corev1.PodPending) && p.DeletionTimestamp == nil {
			return p.Name, nil
		}
	}
	return "", nil
}
