package enforce

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/k8s"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/fromstate"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

var (
	ipFE   = netip.MustParseAddr("10.0.1.1")
	ipBE   = netip.MustParseAddr("10.0.1.2")
	ipNode = netip.MustParseAddr("192.168.0.1")
	feWL   = &proxy.Workload{Namespace: "shop", Name: "fe", Identity: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/frontend"), IPs: []netip.Addr{ipFE}}
	beWL   = &proxy.Workload{Namespace: "shop", Name: "be", Identity: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/backend"), IPs: []netip.Addr{ipBE}}
)

// cluster is the test's namespace, node and pods; be's readiness probe
// targets its named port "health" (8081).
const cluster = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mode: enabled}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: fe, uid: u-fe, labels: {app: fe}}
spec: {nodeName: n1, serviceAccountName: frontend, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: be, uid: u-be, labels: {app: be}}
spec:
  nodeName: n1
  serviceAccountName: backend
  containers:
  - name: app
    image: x
    ports: [{name: health, containerPort: 8081}]
    readinessProbe: {httpGet: {port: health}}
status: {phase: Running, podIP: 10.0.1.2}
`

// snapshot builds the policy snapshot of cluster plus docs through the
// agent's intake (agent/k8s into the state store, then fromstate), as a
// new version of st.
func snapshot(t *testing.T, st *state.Store, docs string) *policy.Snapshot {
	t.Helper()
	var m k8s.Manifests
	if err := m.ParseManifests("test", []byte(cluster+"\n---\n"+docs)); err != nil {
		t.Fatal(err)
	}
	st.Update(m.Apply)
	ps, errs := fromstate.Snapshot(st.Snapshot(), "")
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	return ps
}

func TestCheck(t *testing.T) {
	var cur atomic.Pointer[policy.Snapshot]
	var logs bytes.Buffer
	p, err := New(Config{
		Snapshot: cur.Load,
		Log:      slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	out := &proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportHBONE, Workload: feWL,
		Src: netip.MustParseAddrPort("127.0.0.1:40000"), OrigDst: netip.AddrPortFrom(netip.MustParseAddr("10.96.0.10"), 80),
		Dst: netip.AddrPortFrom(ipBE, 8080), SrcIdentity: feWL.Identity, DstIdentity: beWL.Identity}
	in := &proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportHBONE, Workload: beWL,
		Src: netip.AddrPortFrom(ipFE, 40000), Dst: netip.AddrPortFrom(ipBE, 8080), SrcIdentity: feWL.Identity, DstIdentity: beWL.Identity}
	plain := &proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportPlaintext, Workload: beWL,
		Src: netip.AddrPortFrom(ipFE, 40001), Dst: netip.AddrPortFrom(ipBE, 8080)}
	probe := &proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportPlaintext, Workload: beWL,
		Src: netip.AddrPortFrom(ipNode, 50000), Dst: netip.AddrPortFrom(ipBE, 8081)}

	if d := p.Check(ctx, in); d.Allow || !strings.Contains(d.Reason, "no policy snapshot") {
		t.Fatalf("without a snapshot: %+v", d)
	}

	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	cur.Store(snapshot(t, st, ""))
	for _, f := range []*proxy.Flow{out, in, plain, probe} {
		if d := p.Check(ctx, f); !d.Allow {
			t.Errorf("open snapshot denied %s %s: %s", f.Direction, f.Transport, d.Reason)
		}
	}

	// A policy change: the same open connections are checked again (as
	// proxy.Reevaluate does) and now denied where the new policy says so.
	cur.Store(snapshot(t, st, `
apiVersion: security.nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata: {namespace: shop, name: strict}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: be}
spec:
  selector: {matchLabels: {app: be}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: audit}
spec:
  action: AUDIT
  rules: [{}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: fe-egress}
spec:
  podSelector: {matchLabels: {app: fe}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 8443}]
`))
	for _, tc := range []struct {
		f       *proxy.Flow
		allow   bool
		refusal proxy.RefusalReason
		reason  string
	}{
		{out, false, proxy.RefusedPolicy, "DENY (egress, NetworkPolicy shop/fe-egress)"},
		{in, true, 0, "ALLOW (ingress, AuthorizationPolicy shop/be rule 0)"},
		{plain, false, proxy.RefusedStrictMTLS, "mTLS mode is STRICT"},
		// The kubelet probe from the pod's own node passes STRICT: the
		// engine, not a separate mode check, decides.
		{probe, true, 0, "kubelet probe"},
	} {
		d := p.Check(ctx, tc.f)
		if d.Allow != tc.allow || d.Refusal != tc.refusal || !strings.Contains(d.Reason, tc.reason) {
			t.Errorf("%s %s: %+v, want allow=%v refusal=%v with %q", tc.f.Direction, tc.f.Transport, d, tc.allow, tc.refusal, tc.reason)
		}
	}
	if !strings.Contains(logs.String(), "policy audit") || !strings.Contains(logs.String(), "policy=shop/audit") {
		t.Errorf("AUDIT match not logged:\n%s", logs.String())
	}

	// A CONNECT whose target is not the workload's address is refused.
	bad := *in
	bad.Dst = netip.AddrPortFrom(ipFE, 8080)
	if d := p.Check(ctx, &bad); d.Allow || !strings.Contains(d.Reason, "does not belong") {
		t.Errorf("mismatched target: %+v", d)
	}
	// HBONE without a verified identity is refused.
	anon := *in
	anon.SrcIdentity = spiffeid.ID{}
	if d := p.Check(ctx, &anon); d.Allow {
		t.Errorf("HBONE without identity allowed: %+v", d)
	}
}

// TestStrict: the resolver asks the enforcer whether a destination is
// STRICT; no snapshot, or an unknown pod, is STRICT (fail closed).
func TestStrict(t *testing.T) {
	var cur atomic.Pointer[policy.Snapshot]
	p, err := New(Config{Snapshot: cur.Load})
	if err != nil {
		t.Fatal(err)
	}
	if !p.Strict("shop/be", 8080) {
		t.Error("no snapshot yet: not STRICT")
	}
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	cur.Store(snapshot(t, st, ""))
	if p.Strict("shop/be", 8080) || !p.Strict("shop/nope", 8080) {
		t.Errorf("default PERMISSIVE: shop/be STRICT=%v, unknown pod STRICT=%v", p.Strict("shop/be", 8080), p.Strict("shop/nope", 8080))
	}
	cur.Store(snapshot(t, st, `
apiVersion: security.nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata: {namespace: shop, name: strict}
spec: {mtls: {mode: STRICT}}
`))
	if !p.Strict("shop/be", 8080) {
		t.Error("namespace STRICT: shop/be not STRICT")
	}
}
