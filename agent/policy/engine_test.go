package policy

import (
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
	"weak"

	corev1 "k8s.io/api/core/v1"
)

func TestEngineCachesBySnapshotVersion(t *testing.T) {
	e, err := NewEngine(16)
	if err != nil {
		t.Fatal(err)
	}
	open := shopSnapshot(t, "")
	f := Flow{Src: ipFE, Dst: ipBE, Port: 8080, Protocol: corev1.ProtocolTCP}
	d1 := e.Decide(open, f)
	if !d1.Allowed() {
		t.Fatalf("open snapshot denied:\n%s", d1.Text())
	}
	if d2 := e.Decide(open, f); d2 != d1 {
		t.Error("second decision on the same snapshot was not served from the cache")
	}
	in := shopInput()
	if err := decodePolicies("t", []byte(np("shop", "deny", "podSelector: {}\npolicyTypes: [Ingress]")), &in); err != nil {
		t.Fatal(err)
	}
	closed := NewSnapshot(2, in, Options{})
	d3 := e.Decide(closed, f)
	if d3.Allowed() || d3.SnapshotVersion != 2 {
		t.Fatalf("new snapshot version reused a stale decision:\n%s", d3.Text())
	}
	// Egress-only and ingress-only decisions are cached separately.
	if d := e.DecideEgress(closed, f); !d.Allowed() || d.Direction != Egress {
		t.Errorf("egress-only: %s", d.Text())
	}
	if d := e.DecideIngress(closed, f); d.Allowed() || d.Direction != Ingress {
		t.Errorf("ingress-only: %s", d.Text())
	}
}

func TestNetworkPolicyMeshSemantics(t *testing.T) {
	s := shopSnapshot(t,
		np("shop", "deny-in", "podSelector: {}\npolicyTypes: [Ingress]")+
			// Allowing the HBONE port opens nothing: flows carry the inner port.
			np("shop", "allow-hbone", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- ports: [{port: 15008}]")+
			np("other", "egress", `
podSelector: {}
policyTypes: [Egress]
egress:
- to:
  - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.2/32]}
  ports: [{port: http}]
- to:
  - ipBlock: {cidr: 203.0.113.0/24}`))
	runFlowCases(t, s, []flowCase{
		{name: "HBONE port allowed does not open the inner port (plaintext)", flow: Flow{Src: ipOut, Dst: ipFE, Port: 80}, verdict: Deny, check: CheckNetworkPolicy, policy: "shop/allow-hbone", rule: -1},
		{name: "HBONE port allowed does not open the inner port (mTLS)", flow: Flow{Src: ipBE, Dst: ipFE, Port: 80, Principal: idBE}, verdict: Deny, check: CheckNetworkPolicy, policy: "shop/allow-hbone", rule: -1},
		{name: "resident node always reaches its pod", flow: Flow{Src: ipNode1, Dst: ipFE, Port: 80}, verdict: Allow},
		{name: "another node does not", flow: Flow{Src: ipNode2, Dst: ipFE, Port: 80}, verdict: Deny, policy: "shop/allow-hbone", rule: -1},
		{name: "egress to named port resolves on the destination pod", flow: Flow{Src: ipOT, Dst: netip.MustParseAddr("10.0.1.1"), Port: 8080}, verdict: Deny, check: CheckNetworkPolicy, policy: "other/egress", rule: -1, reasonHas: "to shop/fe"},
		{name: "ipBlock matches an outside address", flow: Flow{Src: ipOT, Dst: ipOut, Port: 443}, verdict: Allow, policy: "other/egress", rule: 1},
		{name: "named port never matches a non-pod destination", flow: Flow{Src: ipOT, Dst: netip.MustParseAddr("10.0.3.3"), Port: 8080}, verdict: Deny, policy: "other/egress", rule: -1},
		{name: "unknown source has no egress policy; destination isolated", flow: Flow{Src: ipOut, Dst: ipBE, Port: 8080}, verdict: Deny, policy: "shop/allow-hbone", rule: -1},
		{name: "destination outside the cluster has no ingress policy", flow: Flow{Src: ipFE, Dst: ipOut, Port: 443}, verdict: Allow},
		{name: "port 0 is an invalid flow", flow: Flow{Src: ipFE, Dst: ipOut}, verdict: Deny, check: CheckFlow, reasonHas: "port 0"},
		{name: "unknown pod is an invalid flow", flow: Flow{SrcPod: "shop/nope", Dst: ipOut, Port: 1}, verdict: Deny, check: CheckFlow, reasonHas: "not in the snapshot"},
		{name: "address not belonging to the named pod is refused", flow: Flow{SrcPod: "shop/fe", Src: ipOT, Dst: ipOut, Port: 1}, verdict: Deny, check: CheckFlow, reasonHas: "does not belong"},
		{name: "bad protocol", flow: Flow{Src: ipFE, Dst: ipOut, Port: 1, Protocol: "ICMP"}, verdict: Deny, check: CheckFlow},
	})
	// With the egress policy's named port resolving on a pod with the name.
	in := shopInput()
	in.Pods[0].Ports = []ContainerPort{{Name: "http", Port: 8080, Protocol: corev1.ProtocolTCP}}
	if err := decodePolicies("t", []byte(np("other", "egress", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- ports: [{port: http}]")), &in); err != nil {
		t.Fatal(err)
	}
	s2 := NewSnapshot(3, in, Options{})
	runFlowCases(t, s2, []flowCase{
		{name: "named port resolved", flow: Flow{Src: ipOT, Dst: ipFE, Port: 8080}, verdict: Allow, policy: "other/egress", rule: 0},
		{name: "named port is per destination pod", flow: Flow{Src: ipOT, Dst: ipBE, Port: 8081}, verdict: Deny, policy: "other/egress", rule: -1},
		{name: "named port protocol must match", flow: Flow{Src: ipOT, Dst: ipFE, Port: 8080, Protocol: corev1.ProtocolUDP}, verdict: Deny, policy: "other/egress", rule: -1},
	})
}

func TestHostNetworkPodIsNotAPodPeer(t *testing.T) {
	in := shopInput()
	in.Pods = append(in.Pods, Pod{Namespace: "shop", Name: "hostnet", Labels: map[string]string{"app": "fe"}, IPs: []netip.Addr{ipNode2}, HostNetwork: true, Node: "n2"})
	if err := decodePolicies("t", []byte(np("shop", "from-fe", "podSelector: {matchLabels: {app: be}}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: fe}}")), &in); err != nil {
		t.Fatal(err)
	}
	s := NewSnapshot(1, in, Options{})
	runFlowCases(t, s, []flowCase{
		{name: "pod peer", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8080}, verdict: Allow, policy: "shop/from-fe", rule: 0},
		{name: "host-network pod with matching labels is not selected", flow: Flow{SrcPod: "shop/hostnet", Dst: ipBE, Port: 8080}, verdict: Deny, policy: "shop/from-fe", rule: -1},
	})
}

func TestNetworkPolicyValidation(t *testing.T) {
	for _, tc := range []struct{ name, spec, want string }{
		{"ipBlock with selector", "podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/8}\n    podSelector: {}", "cannot be combined"},
		{"empty peer", "podSelector: {}\ningress:\n- from:\n  - {}", "none of"},
		{"except outside cidr", "podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}", "not inside"},
		{"bad operator", "podSelector: {matchExpressions: [{key: a, operator: Has}]}", "unknown operator"},
		{"In without values", "podSelector: {matchExpressions: [{key: a, operator: In}]}", "at least one value"},
		{"endPort with named port", "podSelector: {}\negress:\n- ports: [{port: http, endPort: 90}]", "endPort cannot be used"},
		{"endPort below port", "podSelector: {}\negress:\n- ports: [{port: 90, endPort: 80}]", "endPort 80"},
		{"port out of range", "podSelector: {}\negress:\n- ports: [{port: 70000}]", "out of range"},
		{"bad protocol", "podSelector: {}\negress:\n- ports: [{port: 80, protocol: ICMP}]", "ICMP"},
		{"bad policyType", "podSelector: {}\npolicyTypes: [Sideways]", "Sideways"},
		{"misspelt field", "podSelector: {}\ningres:\n- {}", "unknown field"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := shopInput()
			err := decodePolicies("np.yaml", []byte(np("shop", "p", tc.spec)), &in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestUnmeshedDestination(t *testing.T) {
	in := shopInput()
	in.Pods[2].Unmeshed = true // other/ot
	if err := decodePolicies("t", []byte(pa("nodemesh-system", "mesh", "mtls: {mode: STRICT}")+ap("other", "deny-all", "action: DENY\nrules: [{}]")), &in); err != nil {
		t.Fatal(err)
	}
	s := NewSnapshot(1, in, Options{})
	runFlowCases(t, s, []flowCase{
		{name: "STRICT and AuthorizationPolicy do not apply to an unmeshed pod", flow: Flow{Src: ipOut, Dst: ipOT, Port: 80}, verdict: Allow, reasonHas: "no policy restricts"},
		{name: "they do apply to meshed pods", flow: Flow{Src: ipOut, Dst: ipFE, Port: 80}, verdict: Deny, check: CheckMTLS, policy: "nodemesh-system/mesh", rule: -1},
	})
}

// A cached decision does not keep the pod entries of the snapshot that
// made it alive (they hold the pods and their policies).
func TestEngineDoesNotKeepOldSnapshotsAlive(t *testing.T) {
	e, err := NewEngine(16)
	if err != nil {
		t.Fatal(err)
	}
	s := shopSnapshot(t, "")
	e.Decide(s, Flow{Src: ipFE, Dst: ipBE, Port: 8080, Protocol: corev1.ProtocolTCP})
	be := weak.Make(s.pods.Lookup("shop/be"))
	s = nil
	for range 20 {
		runtime.GC()
		if be.Value() == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the engine's cache keeps an old snapshot's pod entry alive")
}
