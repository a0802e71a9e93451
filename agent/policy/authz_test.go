package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// A small cluster: shop/fe (sa frontend) and shop/be (sa backend, probe port
// 8081) on node n1, other/ot (sa other) on node n2, and an outside address.
var (
	ipFE    = netip.MustParseAddr("10.0.1.1")
	ipBE    = netip.MustParseAddr("10.0.1.2")
	ipOT    = netip.MustParseAddr("10.0.2.1")
	ipNode1 = netip.MustParseAddr("192.168.0.1")
	ipNode2 = netip.MustParseAddr("192.168.0.2")
	ipOut   = netip.MustParseAddr("203.0.113.5")
)

const (
	idFE = "spiffe://cluster.local/ns/shop/sa/frontend"
	idBE = "spiffe://cluster.local/ns/shop/sa/backend"
	idOT = "spiffe://cluster.local/ns/other/sa/other"
)

func shopInput() Input {
	return Input{
		Namespaces: []Namespace{{Name: "shop", Labels: map[string]string{"team": "shop"}}, {Name: "other"}},
		Nodes:      []Node{{Name: "n1", IPs: []netip.Addr{ipNode1}}, {Name: "n2", IPs: []netip.Addr{ipNode2}}},
		Pods: []Pod{
			{Namespace: "shop", Name: "fe", Labels: map[string]string{"app": "fe"}, IPs: []netip.Addr{ipFE}, ServiceAccount: "frontend", Node: "n1"},
			{Namespace: "shop", Name: "be", Labels: map[string]string{"app": "be"}, IPs: []netip.Addr{ipBE}, ServiceAccount: "backend", Node: "n1",
				Ports: []ContainerPort{{Name: "http", Port: 8080, Protocol: corev1.ProtocolTCP}}, ProbePorts: []int32{8081}},
			{Namespace: "other", Name: "ot", Labels: map[string]string{"app": "ot"}, IPs: []netip.Addr{ipOT}, ServiceAccount: "other", Node: "n2"},
		},
	}
}

func shopSnapshot(t *testing.T, docs string) *Snapshot {
	t.Helper()
	in := shopInput()
	if err := decodePolicies("test", []byte(docs), &in); err != nil {
		t.Fatalf("decoding: %v", err)
	}
	s := NewSnapshot(1, in, Options{})
	if p := s.Problems(); len(p) > 0 {
		t.Fatalf("problems: %v", p)
	}
	return s
}

func ap(ns, name, spec string) string {
	return "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  namespace: " + ns + "\n  name: " + name + "\nspec:\n" + indent(spec, "  ") + "\n---\n"
}

func pa(ns, name, spec string) string {
	return "apiVersion: security.nodemesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  namespace: " + ns + "\n  name: " + name + "\nspec:\n" + indent(spec, "  ") + "\n---\n"
}

type flowCase struct {
	name      string
	flow      Flow
	verdict   Verdict
	check     string // deciding check for DENY ("" = don't care)
	policy    string // "ns/name" of the deciding policy ("" = none expected)
	rule      int
	audit     []string
	reasonHas string
}

func runFlowCases(t *testing.T, s *Snapshot, cases []flowCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.flow.Protocol == "" {
				tc.flow.Protocol = corev1.ProtocolTCP
			}
			d := s.Decide(tc.flow)
			if d.Verdict != tc.verdict {
				t.Fatalf("verdict %s, want %s\n%s", d.Verdict, tc.verdict, d.Text())
			}
			gotPol := ""
			if !d.Policy.IsZero() {
				gotPol = d.Policy.Namespace + "/" + d.Policy.Name
			}
			if gotPol != tc.policy {
				t.Errorf("policy %q, want %q\n%s", gotPol, tc.policy, d.Text())
			}
			if tc.policy != "" && d.Rule != tc.rule {
				t.Errorf("rule %d, want %d\n%s", d.Rule, tc.rule, d.Text())
			}
			if tc.check != "" {
				last := d.Steps[len(d.Steps)-1]
				if last.Check != tc.check {
					t.Errorf("deciding check %s, want %s\n%s", last.Check, tc.check, d.Text())
				}
			}
			var audit []string
			for _, a := range d.Audit {
				audit = append(audit, a.Namespace+"/"+a.Name)
			}
			if strings.Join(audit, ",") != strings.Join(tc.audit, ",") {
				t.Errorf("audit %v, want %v", audit, tc.audit)
			}
			if tc.reasonHas != "" && !strings.Contains(d.Reason, tc.reasonHas) {
				t.Errorf("reason %q lacks %q", d.Reason, tc.reasonHas)
			}
		})
	}
}

func TestAuthorizationPolicy(t *testing.T) {
	s := shopSnapshot(t, ap("shop", "be-allow", `
selector: {matchLabels: {app: be}}
action: ALLOW
rules:
- from:
  - source: {principals: ["cluster.local/ns/shop/sa/frontend"]}
  to:
  - operation: {ports: ["8080"]}
- from:
  - source: {namespaces: ["oth*"], notPrincipals: ["*/sa/blocked"]}
  to:
  - operation: {notPorts: ["9000"]}
- from:
  - source: {ipBlocks: ["203.0.113.0/24"], notIpBlocks: ["203.0.113.7"]}
`)+ap("shop", "be-deny-admin", `
selector: {matchLabels: {app: be}}
action: DENY
rules:
- to:
  - operation: {ports: ["9090"]}
- from:
  - source: {principals: ["spiffe://cluster.local/ns/other/sa/evil*"]}
`)+ap("shop", "audit-all", `
action: AUDIT
rules:
- from:
  - source: {notNamespaces: [shop]}
`)+ap("nodemesh-system", "mesh-deny-suffix", `
action: DENY
rules:
- from:
  - source: {principals: ["*/sa/banned"]}
`))
	runFlowCases(t, s, []flowCase{
		{name: "principal exact allows", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8080, Principal: idFE}, verdict: Allow, policy: "shop/be-allow", rule: 0},
		{name: "principal on wrong port denied", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8443, Principal: idFE}, verdict: Deny, check: CheckAuthorizationPolicy, policy: "shop/be-allow", rule: -1},
		{name: "plaintext never matches a principal rule", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8080}, verdict: Deny, check: CheckAuthorizationPolicy, policy: "shop/be-allow", rule: -1, reasonHas: "plaintext source"},
		{name: "namespace prefix allows other ns", flow: Flow{Src: ipOT, Dst: ipBE, Port: 8443, Principal: idOT}, verdict: Allow, policy: "shop/be-allow", rule: 1, audit: []string{"shop/audit-all"}},
		{name: "notPorts excludes", flow: Flow{Src: ipOT, Dst: ipBE, Port: 9000, Principal: idOT}, verdict: Deny, policy: "shop/be-allow", rule: -1, audit: []string{"shop/audit-all"}},
		{name: "DENY port wins over ALLOW", flow: Flow{Src: ipOT, Dst: ipBE, Port: 9090, Principal: idOT}, verdict: Deny, check: CheckAuthorizationPolicy, policy: "shop/be-deny-admin", rule: 0, audit: []string{"shop/audit-all"}},
		{name: "DENY principal prefix", flow: Flow{Src: netip.MustParseAddr("10.0.9.9"), Dst: ipBE, Port: 8080, Principal: "spiffe://cluster.local/ns/other/sa/evil-1"}, verdict: Deny, policy: "shop/be-deny-admin", rule: 1, audit: []string{"shop/audit-all"}},
		{name: "mesh-wide DENY suffix from root namespace", flow: Flow{Src: netip.MustParseAddr("10.0.9.9"), Dst: ipFE, Port: 80, Principal: "spiffe://cluster.local/ns/x/sa/banned"}, verdict: Deny, policy: "nodemesh-system/mesh-deny-suffix", rule: 0, audit: []string{"shop/audit-all"}},
		{name: "ipBlock allows plaintext outside client", flow: Flow{Src: ipOut, Dst: ipBE, Port: 1234}, verdict: Allow, policy: "shop/be-allow", rule: 2},
		{name: "notIpBlocks excludes", flow: Flow{Src: netip.MustParseAddr("203.0.113.7"), Dst: ipBE, Port: 1234}, verdict: Deny, policy: "shop/be-allow", rule: -1},
		{name: "notPrincipals in ALLOW does not match plaintext", flow: Flow{Src: netip.MustParseAddr("10.9.9.9"), Dst: ipBE, Port: 8443}, verdict: Deny, policy: "shop/be-allow", rule: -1},
		{name: "workload without ALLOW policies is open", flow: Flow{Src: ipOT, Dst: ipFE, Port: 80}, verdict: Allow, audit: nil},
		{name: "AUDIT notNamespaces matches an authenticated outsider only", flow: Flow{Src: ipOT, Dst: ipFE, Port: 80, Principal: idOT}, verdict: Allow, audit: []string{"shop/audit-all"}},
		{name: "kubelet probe exempt from ALLOW", flow: Flow{Src: ipNode1, Dst: ipBE, Port: 8081}, verdict: Allow},
		{name: "node to a non-probe port still needs ALLOW", flow: Flow{Src: ipNode1, Dst: ipBE, Port: 8080}, verdict: Deny, policy: "shop/be-allow", rule: -1},
		{name: "other node is not a probe source", flow: Flow{Src: ipNode2, Dst: ipBE, Port: 8081}, verdict: Deny, policy: "shop/be-allow", rule: -1},
		{name: "stolen identity: principal does not match the pod at the source IP", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8080, Principal: idOT}, verdict: Deny, check: CheckMTLS, reasonHas: "does not match"},
		{name: "UDP is not subject to AuthorizationPolicy", flow: Flow{Src: ipOut, Dst: ipBE, Port: 9090, Protocol: corev1.ProtocolUDP}, verdict: Allow},
	})
}

func TestAuthorizationPolicyDenyNotPrincipalsMatchesPlaintext(t *testing.T) {
	s := shopSnapshot(t, ap("shop", "require-mtls", `
action: DENY
rules:
- from:
  - source: {notPrincipals: ["*"]}
`))
	runFlowCases(t, s, []flowCase{
		{name: "plaintext denied", flow: Flow{Src: ipOut, Dst: ipBE, Port: 8080}, verdict: Deny, policy: "shop/require-mtls", rule: 0},
		{name: "mTLS allowed", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8080, Principal: idFE}, verdict: Allow},
	})
}

func TestAuthorizationPolicyEmptyAllowDeniesAll(t *testing.T) {
	s := shopSnapshot(t, ap("shop", "deny-by-empty-allow", "{}")+ap("other", "allow-all", "rules: [{}]"))
	runFlowCases(t, s, []flowCase{
		{name: "empty ALLOW spec allows nothing", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8080, Principal: idFE}, verdict: Deny, policy: "shop/deny-by-empty-allow", rule: -1},
		{name: "rules: [{}] allows everything", flow: Flow{Src: ipOut, Dst: ipOT, Port: 1}, verdict: Allow, policy: "other/allow-all", rule: 0},
	})
}

func TestAuthorizationPolicyRefusals(t *testing.T) {
	cases := []struct {
		name, spec string
		l7         bool
		wantErr    string
	}{
		{"method not a token", "rules:\n- to:\n  - operation: {methods: ['GE T']}", false, "to[0].operation.methods"},
		{"encoded path", "rules:\n- to:\n  - operation: {paths: ['/a%2Fb']}", false, "%-escapes"},
		{"unnormalised path", "rules:\n- to:\n  - operation: {notPaths: ['/a/../b']}", false, "normalised"},
		{"path template", "rules:\n- to:\n  - operation: {paths: ['/{*}']}", false, "templates"},
		{"when on source.ip", "rules:\n- when:\n  - {key: source.ip, values: [10.0.0.1]}", false, "request.headers"},
		{"when on x-forwarded-for", "rules:\n- when:\n  - {key: \"request.headers[X-Forwarded-For]\", values: [a]}", false, "never decides"},
		{"when without values", "rules:\n- when:\n  - {key: \"request.headers[x]\"}", false, "values or notValues"},
		{"requestPrincipals", "rules:\n- from:\n  - source: {requestPrincipals: ['*']}", true, "requestPrincipals"},
		{"remoteIpBlocks", "rules:\n- from:\n  - source: {remoteIpBlocks: [1.2.3.4]}", true, "remoteIpBlocks"},
		{"custom", "action: CUSTOM\nprovider: {name: x}", false, "CUSTOM"},
		{"bad action", "action: MAYBE", false, "MAYBE"},
		{"bad port", "rules:\n- to:\n  - operation: {ports: [http]}", false, "named ports are not supported"},
		{"mapped cidr too short", "rules:\n- from:\n  - source: {notIpBlocks: ['::ffff:0.0.0.0/80']}", false, "IPv4-mapped"},
		{"bad cidr", "rules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/33]}", false, "10.0.0.0/33"},
		{"middle wildcard", "rules:\n- from:\n  - source: {principals: ['cluster.local/*/sa/x']}", false, "single leading or trailing"},
		{"not a spiffe id", "rules:\n- from:\n  - source: {principals: [frontend]}", false, "not a SPIFFE ID"},
		{"unknown field", "rules:\n- from:\n  - source: {principal: [x]}", false, "unknown field"},
		{"serviceAccounts", "rules:\n- from:\n  - source: {serviceAccounts: [x]}", false, "not supported yet"},
		{"targetRefs", "targetRefs: [{kind: Gateway, name: g}]", false, "targetRef"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := shopInput()
			err := decodePolicies("test.yaml", []byte(ap("shop", "p", tc.spec)), &in)
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "test.yaml: document 1") {
				t.Errorf("error %q lacks %q or its location", err, tc.wantErr)
			}
			if errors.Is(err, ErrL7Unsupported) != tc.l7 {
				t.Errorf("errors.Is(ErrL7Unsupported) = %v, want %v (%v)", !tc.l7, tc.l7, err)
			}
		})
	}
}

// A refused policy that reaches a snapshot anyway (the agent keeps running on
// a bad object) fails closed: a refused DENY denies, a refused ALLOW selects
// and matches nothing, a refused PeerAuthentication is STRICT.
func TestRefusedPoliciesFailClosed(t *testing.T) {
	in := shopInput()
	var bad Input
	// Decode refuses these, so build them by decoding without validation.
	for _, doc := range []string{
		ap("shop", "deny-l7", "selector: {matchLabels: {app: be}}\naction: DENY\nrules:\n- from:\n  - source: {requestPrincipals: ['*']}"),
		ap("other", "allow-l7", "rules:\n- to:\n  - operation: {paths: ['/a/./b']}"),
		pa("shop", "disable", "selector: {matchLabels: {app: fe}}\nmtls: {mode: DISABLE}"),
	} {
		if err := decodePolicies("bad", []byte(doc), &bad); err == nil {
			t.Fatalf("Decode accepted %s", doc)
		}
	}
	in.AuthorizationPolicies = append(in.AuthorizationPolicies, mustDecodeAP(t, ap("shop", "deny-l7", "selector: {matchLabels: {app: be}}\naction: DENY\nrules:\n- from:\n  - source: {requestPrincipals: ['*']}")),
		mustDecodeAP(t, ap("other", "allow-l7", "rules:\n- to:\n  - operation: {paths: ['/a/./b']}")))
	in.PeerAuthentications = append(in.PeerAuthentications, mustDecodePA(t, pa("shop", "disable", "selector: {matchLabels: {app: fe}}\nmtls: {mode: DISABLE}")))
	s := NewSnapshot(7, in, Options{})
	if got := len(s.Problems()); got != 3 {
		t.Fatalf("%d problems, want 3: %v", got, s.Problems())
	}
	runFlowCases(t, s, []flowCase{
		{name: "refused DENY denies everything to its workloads", flow: Flow{Src: ipFE, Dst: ipBE, Port: 8080, Principal: idFE}, verdict: Deny, policy: "shop/deny-l7", rule: -1, reasonHas: "refused"},
		{name: "refused ALLOW allows nothing", flow: Flow{Src: ipFE, Dst: ipOT, Port: 80, Principal: idFE}, verdict: Deny, policy: "other/allow-l7", rule: -1, reasonHas: "refused"},
		{name: "refused DISABLE is STRICT", flow: Flow{Src: ipOut, Dst: ipFE, Port: 80}, verdict: Deny, check: CheckMTLS, policy: "shop/disable", rule: -1, reasonHas: "STRICT"},
	})
}

func TestMTLSMode(t *testing.T) {
	s := shopSnapshot(t, pa("nodemesh-system", "mesh", "mtls: {mode: STRICT}")+
		pa("other", "ns-permissive", "mtls: {mode: PERMISSIVE}")+
		pa("shop", "be-ports", `
selector: {matchLabels: {app: be}}
mtls: {mode: UNSET}
portLevelMtls:
  "8080": {mode: PERMISSIVE}
  "9000": {mode: UNSET}`))
	runFlowCases(t, s, []flowCase{
		{name: "mesh-wide STRICT refuses plaintext", flow: Flow{Src: ipOut, Dst: ipFE, Port: 80}, verdict: Deny, check: CheckMTLS, policy: "nodemesh-system/mesh", rule: -1},
		{name: "mesh-wide STRICT accepts mTLS", flow: Flow{Src: ipBE, Dst: ipFE, Port: 80, Principal: idBE}, verdict: Allow, policy: "nodemesh-system/mesh", rule: -1},
		{name: "namespace PERMISSIVE beats mesh STRICT", flow: Flow{Src: ipOut, Dst: ipOT, Port: 80}, verdict: Allow, policy: "other/ns-permissive", rule: -1},
		{name: "port-level PERMISSIVE beats mesh STRICT", flow: Flow{Src: ipOut, Dst: ipBE, Port: 8080}, verdict: Allow, policy: "shop/be-ports", rule: -1},
		{name: "port-level UNSET inherits (mesh STRICT)", flow: Flow{Src: ipOut, Dst: ipBE, Port: 9000}, verdict: Deny, check: CheckMTLS, policy: "nodemesh-system/mesh", rule: -1},
		{name: "workload UNSET inherits on other ports", flow: Flow{Src: ipOut, Dst: ipBE, Port: 8443}, verdict: Deny, check: CheckMTLS, policy: "nodemesh-system/mesh", rule: -1},
		{name: "kubelet probe from own node passes STRICT", flow: Flow{Src: ipNode1, Dst: ipBE, Port: 8081}, verdict: Allow, policy: "nodemesh-system/mesh", rule: -1, reasonHas: "kubelet probe"},
		{name: "node to non-probe port refused under STRICT", flow: Flow{Src: ipNode1, Dst: ipBE, Port: 8443}, verdict: Deny, check: CheckMTLS, policy: "nodemesh-system/mesh", rule: -1},
		{name: "probe port from another node refused", flow: Flow{Src: ipNode2, Dst: ipBE, Port: 8081}, verdict: Deny, check: CheckMTLS, policy: "nodemesh-system/mesh", rule: -1},
		{name: "UDP is not subject to mTLS mode", flow: Flow{Src: ipOut, Dst: ipFE, Port: 53, Protocol: corev1.ProtocolUDP}, verdict: Allow},
	})

	def := shopSnapshot(t, "")
	runFlowCases(t, def, []flowCase{
		{name: "PERMISSIVE by default", flow: Flow{Src: ipOut, Dst: ipFE, Port: 80}, verdict: Allow},
	})
}

func TestMTLSNarrowestWinsOverNamespace(t *testing.T) {
	s := shopSnapshot(t, pa("shop", "ns-strict", "mtls: {mode: STRICT}")+
		pa("shop", "fe-permissive", "selector: {matchLabels: {app: fe}}\nmtls: {mode: PERMISSIVE}")+
		pa("shop", "be-port", "selector: {matchLabels: {app: be}}\nportLevelMtls:\n  \"8080\": {mode: PERMISSIVE}"))
	runFlowCases(t, s, []flowCase{
		{name: "workload PERMISSIVE beats namespace STRICT", flow: Flow{Src: ipOut, Dst: ipFE, Port: 80}, verdict: Allow, policy: "shop/fe-permissive", rule: -1},
		{name: "port PERMISSIVE", flow: Flow{Src: ipOut, Dst: ipBE, Port: 8080}, verdict: Allow, policy: "shop/be-port", rule: -1},
		{name: "namespace STRICT elsewhere", flow: Flow{Src: ipOut, Dst: ipBE, Port: 8443}, verdict: Deny, check: CheckMTLS, policy: "shop/ns-strict", rule: -1},
	})
}

func TestPeerAuthenticationRefusals(t *testing.T) {
	for _, tc := range []struct{ name, spec, want string }{
		{"disable", "mtls: {mode: DISABLE}", "DISABLE is not supported"},
		{"bad mode", "mtls: {mode: STRIKT}", "STRIKT"},
		{"port level without selector", "portLevelMtls:\n  \"80\": {mode: STRICT}", "needs spec.selector"},
		{"bad port key", "selector: {matchLabels: {a: b}}\nportLevelMtls:\n  \"http\": {mode: STRICT}", "http"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := shopInput()
			err := decodePolicies("pa.yaml", []byte(pa("shop", "p", tc.spec)), &in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func mustDecodeAP(t *testing.T, doc string) *v1alpha1.AuthorizationPolicy {
	t.Helper()
	var ap v1alpha1.AuthorizationPolicy
	if err := yaml.UnmarshalStrict([]byte(strings.TrimSuffix(doc, "---\n")), &ap); err != nil {
		t.Fatal(err)
	}
	return &ap
}

func mustDecodePA(t *testing.T, doc string) *v1alpha1.PeerAuthentication {
	t.Helper()
	var pa v1alpha1.PeerAuthentication
	if err := yaml.UnmarshalStrict([]byte(strings.TrimSuffix(doc, "---\n")), &pa); err != nil {
		t.Fatal(err)
	}
	return &pa
}
