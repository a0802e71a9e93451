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

	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/proxy"
)

var (
	ipFE   = netip.MustParseAddr("10.0.1.1")
	ipBE   = netip.MustParseAddr("10.0.1.2")
	ipNode = netip.MustParseAddr("192.168.0.1")
	feWL   = &proxy.Workload{Namespace: "shop", Name: "fe", Identity: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/frontend"), IPs: []netip.Addr{ipFE}}
	beWL   = &proxy.Workload{Namespace: "shop", Name: "be", Identity: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/backend"), IPs: []netip.Addr{ipBE}}
)

func snapshot(t *testing.T, version uint64, docs string) *policy.Snapshot {
	t.Helper()
	in := policy.Input{
		Namespaces: []policy.Namespace{{Name: "shop"}},
		Nodes:      []policy.Node{{Name: "n1", IPs: []netip.Addr{ipNode}}},
		Pods: []policy.Pod{
			{Namespace: "shop", Name: "fe", Labels: map[string]string{"app": "fe"}, IPs: []netip.Addr{ipFE}, ServiceAccount: "frontend", Node: "n1"},
			{Namespace: "shop", Name: "be", Labels: map[string]string{"app": "be"}, IPs: []netip.Addr{ipBE}, ServiceAccount: "backend", Node: "n1", ProbePorts: []int32{8081}},
		},
	}
	if _, err := policy.Decode("test", []byte(docs), &in); err != nil {
		t.Fatal(err)
	}
	return policy.NewSnapshot(version, in, policy.Options{})
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

	cur.Store(snapshot(t, 1, ""))
	for _, f := range []*proxy.Flow{out, in, plain, probe} {
		if d := p.Check(ctx, f); !d.Allow {
			t.Errorf("open snapshot denied %s %s: %s", f.Direction, f.Transport, d.Reason)
		}
	}

	// A policy change: the same open connections are checked again (as
	// proxy.Reevaluate does) and now denied where the new policy says so.
	cur.Store(snapshot(t, 2, `
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
