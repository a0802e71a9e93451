package manifests_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient/apiclienttest"
	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/manifests"
)

// agentLeasePolicy names the ValidatingAdmissionPolicy (and its binding) in
// manifests/base/agent/admission.yaml.
const agentLeasePolicy = "nodemesh-agent-lease"

// agentLeaseHolderPolicy warns when the agent names a foreign holder.
const agentLeaseHolderPolicy = "nodemesh-agent-lease-holder"

// nodeNameExtra is the user-info extra the API server sets from a
// pod-bound service-account token (Kubernetes >= 1.32).
const nodeNameExtra = "authentication.kubernetes.io/node-name"

// TestLabAgentLeaseAdmission installs the base manifests into the lab's real
// kube-apiserver and shows that the admission policy confines each agent to
// its own node's mark, which RBAC alone cannot do: with a token bound to its
// pod on node-1, the agent's service account creates, renews and deletes
// nodemesh-agent-node-1 (also through the real rollout.Mark), and is refused
// creating, updating or deleting node-2's mark or any other Lease, and
// naming a foreign holder; a token of the same service account that is not
// bound to a pod (no node) is refused outright, although RBAC allows it.
func TestLabAgentLeaseAdmission(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := startCluster(ctx, t)
	admin := c.srv.Client

	objs, err := manifests.Render("base")
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, o := range objs {
		if (o.GetName() == agentLeasePolicy || o.GetName() == agentLeaseHolderPolicy) && strings.HasPrefix(o.GetKind(), "ValidatingAdmissionPolicy") {
			found++
		}
		if err := c.apply(ctx, o, false); err != nil {
			t.Fatal(err)
		}
	}
	if found != 4 {
		t.Fatalf("the base install renders %d of the policies %s, %s and their bindings, want 4", found, agentLeasePolicy, agentLeaseHolderPolicy)
	}

	pods := map[string]*corev1.Pod{}
	for _, node := range []string{"node-1", "node-2"} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating node %s: %v", node, err)
		}
		pods[node] = mustCreatePod(ctx, t, admin, ns, "nodemesh-agent-"+node, "nodemesh-agent", node)
	}
	var warnings warningLog
	agent1Cfg := c.srv.ClientFor(token(ctx, t, admin, "nodemesh-agent", nil, pods["node-1"]))
	agent1Cfg.WarningHandler = &warnings
	agent1, err := kubernetes.NewForConfig(agent1Cfg)
	if err != nil {
		t.Fatal(err)
	}
	agent2 := clientFor(t, c, token(ctx, t, admin, "nodemesh-agent", nil, pods["node-2"]))
	unbound := clientFor(t, c, token(ctx, t, admin, "nodemesh-agent", nil, nil))

	// The API server puts the pod's node in the bound token's user info;
	// without that the policy could only refuse everything.
	who, err := agent1.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("self subject review as the node-1 agent: %v", err)
	}
	if got := who.Status.UserInfo.Extra[nodeNameExtra]; len(got) != 1 || got[0] != "node-1" {
		t.Fatalf("the node-1 agent's pod-bound token has user info %+v, want extra %s=[node-1]", who.Status.UserInfo, nodeNameExtra)
	}

	// The policy takes effect a moment after it is created (type checking,
	// then the admission plugin's informer): poll with a dry run, which
	// admission sees like a write, until it refuses.
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := agent1.CoordinationV1().Leases(ns).Create(ctx, lease("other-lease", "node-1"), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return deniedByPolicy(err), nil
	})
	if err != nil {
		vap, gerr := admin.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(ctx, agentLeasePolicy, metav1.GetOptions{})
		t.Fatalf("the policy %s never took effect: %v (policy status %+v, %v)", agentLeasePolicy, err, vap.Status, gerr)
	}

	leases := func(c kubernetes.Interface) leaseOps { return leaseOps{t: t, c: c} }
	own, other := "nodemesh-agent-node-1", "nodemesh-agent-node-2"

	// Refused: another node's mark and any other Lease, in each verb.
	leases(agent1).create(ctx, other, "node-1", "may only write its own node mark")
	leases(agent1).create(ctx, other, "node-2", "may only write its own node mark")
	leases(agent1).create(ctx, "other-lease", "node-1", "may only write node marks")
	leases(admin).create(ctx, other, "node-2", "")
	leases(admin).create(ctx, "other-lease", "someone", "")
	leases(agent1).update(ctx, other, "node-1", "may only write its own node mark")
	leases(agent1).update(ctx, "other-lease", "node-1", "may only write node marks")
	leases(agent1).remove(ctx, other, "may only write its own node mark")
	leases(agent1).remove(ctx, "other-lease", "may only write node marks")
	for _, name := range []string{other, "other-lease"} {
		if _, err := admin.CoordinationV1().Leases(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
			t.Errorf("lease %s after the refused writes: %v", name, err)
		}
	}
	// The node-2 agent holds node-2's mark.
	leases(agent2).update(ctx, other, "node-2", "")
	leases(agent2).remove(ctx, other, "")

	// Allowed: its own mark, with its node or its pod as holder, or none.
	leases(agent1).create(ctx, own, "node-1", "")
	leases(agent1).update(ctx, own, pods["node-1"].Name, "")
	// A foreign holder is only warned about (older agents named the
	// host's hostname, which need not be their node's name).
	// The warning policy is a separate binding, which the API server may
	// start enforcing a moment after the refusing one: retry for a while.
	var w string
	for deadline := time.Now().Add(30 * time.Second); ; {
		warnings.reset()
		leases(agent1).update(ctx, own, "node-2", "")
		if w = warnings.String(); strings.Contains(w, "names node-2 as holder of Lease "+own) || time.Now().After(deadline) {
			break
		}
		leases(agent1).update(ctx, own, "node-1", "")
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(w, "names node-2 as holder of Lease "+own) {
		t.Errorf("naming node-2 as holder of %s: warnings %q, want the holder policy's", own, w)
	}
	warnings.reset()
	leases(agent1).update(ctx, own, "node-1", "")
	if w := warnings.String(); w != "" {
		t.Errorf("naming its node as holder of %s: warnings %q, want none", own, w)
	}
	leases(agent1).update(ctx, own, "", "")
	leases(agent1).remove(ctx, own, "")

	// A token of the same service account that is bound to no pod: RBAC
	// lets it write Leases, the policy does not.
	review(ctx, t, "the unbound agent token", unbound, []access{{verb: "create", group: "coordination.k8s.io", resource: "leases", namespace: ns, want: true}})
	leases(unbound).create(ctx, own, "node-1", "token carries no node")
	leases(admin).create(ctx, own, "node-1", "")
	leases(unbound).update(ctx, own, "node-1", "token carries no node")
	leases(unbound).remove(ctx, own, "token carries no node")
	leases(admin).remove(ctx, own, "")

	// The real mark: the node-1 agent's rollout.Mark holds and withdraws
	// its Lease through the policy; pointed at node-2 it never marks.
	holdsMark(ctx, t, agent1, "node-1", true)
	holdsMark(ctx, t, agent1, "node-2", false)
}

// holdsMark runs a rollout.Mark for node with client c for a while and
// checks whether its Lease appeared (want) and that none is left after.
func holdsMark(ctx context.Context, t *testing.T, c kubernetes.Interface, node string, want bool) {
	t.Helper()
	var log lockedBuffer
	m, err := rollout.NewMark(rollout.MarkConfig{Client: apiclienttest.FromClientset(c), Namespace: ns, Node: node,
		Ready: func(context.Context) bool { return true }, Log: slog.New(slog.NewTextHandler(&log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	mctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var runErr error
	wg.Go(func() { runErr = m.Run(mctx) })
	// The positive case returns as soon as the Lease is seen; the negative
	// one waits for several refused attempts (every 200ms while not held).
	timeout := 5 * time.Second
	if want {
		timeout = time.Minute
	}
	werr := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		l, err := c.CoordinationV1().Leases(ns).Get(ctx, rollout.LeaseName(node), metav1.GetOptions{})
		return err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == node, nil
	})
	if !want && werr == nil {
		t.Errorf("a mark for %s appeared, written by another node's agent", node)
	}
	if want && werr != nil {
		t.Errorf("the agent's own mark for %s never appeared: %v\n%s", node, werr, log.String())
	}
	if refused := strings.Contains(log.String(), "ValidatingAdmissionPolicy '"+agentLeasePolicy+"'"); refused == want {
		t.Errorf("mark for %s: refused by the policy %v, want %v; log:\n%s", node, refused, !want, log.String())
	}
	stop()
	wg.Wait()
	if runErr != nil {
		t.Errorf("withdrawing the mark for %s: %v", node, runErr)
	}
	if _, err := c.CoordinationV1().Leases(ns).Get(ctx, rollout.LeaseName(node), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the mark for %s after the mark stopped: %v, want not found", node, err)
	}
}

func clientFor(t *testing.T, c *cluster, tok string) kubernetes.Interface {
	t.Helper()
	cs, err := kubernetes.NewForConfig(c.srv.ClientFor(tok))
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func lease(name, holder string) *coordinationv1.Lease {
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: coordinationv1.LeaseSpec{LeaseDurationSeconds: ptr.To(int32(10))}}
	if holder != "" {
		l.Spec.HolderIdentity = ptr.To(holder)
	}
	return l
}

// deniedByPolicy: err is the policy's refusal (not RBAC's, not another
// policy's).
func deniedByPolicy(err error) bool {
	var st apierrors.APIStatus
	return err != nil && errors.As(err, &st) && apierrors.IsForbidden(err) &&
		strings.Contains(st.Status().Message, "ValidatingAdmissionPolicy '"+agentLeasePolicy+"'")
}

// leaseOps writes Leases as one caller and checks the outcome: denied ==
// "" means the write must succeed, otherwise it must be the policy's
// refusal with a message containing denied.
type leaseOps struct {
	t *testing.T
	c kubernetes.Interface
}

func (o leaseOps) check(op, name string, err error, denied string) {
	o.t.Helper()
	switch {
	case denied == "" && err != nil:
		o.t.Errorf("%s lease %s: %v, want success", op, name, err)
	case denied != "" && err == nil:
		o.t.Errorf("%s lease %s succeeded, want the policy's refusal (%q)", op, name, denied)
	case denied != "" && (!deniedByPolicy(err) || !strings.Contains(err.Error(), denied)):
		o.t.Errorf("%s lease %s: %v, want the policy's refusal containing %q", op, name, err, denied)
	case denied != "":
		o.t.Logf("%s lease %s refused: %v", op, name, err)
	}
}

func (o leaseOps) create(ctx context.Context, name, holder, denied string) {
	o.t.Helper()
	_, err := o.c.CoordinationV1().Leases(ns).Create(ctx, lease(name, holder), metav1.CreateOptions{})
	o.check("create", name, err, denied)
}

// update renews the Lease (read as this caller, which RBAC allows) with
// holder ("" = none).
func (o leaseOps) update(ctx context.Context, name, holder, denied string) {
	o.t.Helper()
	l, err := o.c.CoordinationV1().Leases(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		o.t.Fatalf("reading lease %s: %v", name, err)
	}
	l.Spec.HolderIdentity = nil
	if holder != "" {
		l.Spec.HolderIdentity = ptr.To(holder)
	}
	l.Spec.RenewTime = ptr.To(metav1.NewMicroTime(time.Now()))
	_, err = o.c.CoordinationV1().Leases(ns).Update(ctx, l, metav1.UpdateOptions{})
	o.check("update", name, err, denied)
}

func (o leaseOps) remove(ctx context.Context, name, denied string) {
	o.t.Helper()
	err := o.c.CoordinationV1().Leases(ns).Delete(ctx, name, metav1.DeleteOptions{})
	o.check("delete", name, err, denied)
}

// warningLog collects the API server's warnings (rest.WarningHandler).
type warningLog struct {
	mu sync.Mutex
	w  []string
}

func (l *warningLog) HandleWarningHeader(code int, agent, text string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.w = append(l.w, text)
}

func (l *warningLog) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.w = nil
}

func (l *warningLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.w, "; ")
}
