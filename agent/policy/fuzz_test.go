package policy

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

func fuzzSeeds(f *testing.F) {
	for _, tc := range e2eCases() {
		for _, st := range tc.steps {
			f.Add([]byte(st.policies))
		}
	}
	files, _ := filepath.Glob(filepath.Join("explain", "testdata", "*", "*.yaml"))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte(ap("shop", "x", "rules:\n- from:\n  - source: {principals: ['*'], notNamespaces: ['a*'], ipBlocks: ['::1', '10.0.0.0/8']}\n  to:\n  - operation: {ports: ['1'], notPorts: ['65535']}")))
	f.Add([]byte(pa("shop", "x", "selector: {matchLabels: {app: be}}\nmtls: {mode: STRICT}\nportLevelMtls: {'80': {mode: PERMISSIVE}}")))
	f.Add([]byte("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n"))
	f.Add([]byte("{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"p\"},\"status\":{\"podIP\":\"::ffff:10.0.0.1\"}}"))
	f.Add([]byte("---\n---\n# only comments\n"))
	f.Add([]byte("kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: n}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: '::/0', except: ['::1/128']}\n    ports: [{port: 1, endPort: 65535, protocol: SCTP}]\n"))
}

// fuzzFlows are evaluated against every snapshot the fuzzers build.
var fuzzFlows = []Flow{
	{Src: ipFE, Dst: ipBE, Port: 8080, Protocol: corev1.ProtocolTCP, Principal: idFE},
	{Src: ipOut, Dst: ipBE, Port: 8081, Protocol: corev1.ProtocolTCP},
	{Src: ipNode1, Dst: ipBE, Port: 8081, Protocol: corev1.ProtocolTCP},
	{Src: ipOT, Dst: ipOut, Port: 53, Protocol: corev1.ProtocolUDP},
	{SrcPod: "shop/fe", DstPod: "other/ot", Port: 1, Protocol: corev1.ProtocolSCTP, Principal: "spiffe://x/y"},
	{Src: netip.MustParseAddr("::1"), Dst: netip.MustParseAddr("10.0.0.1"), Port: 65535, Protocol: corev1.ProtocolTCP},
}

func checkSnapshot(t *testing.T, in Input) {
	s := NewSnapshot(1, in, Options{})
	for _, f := range fuzzFlows {
		for _, d := range []*Decision{s.Decide(f), s.DecideEgress(f), s.DecideIngress(f)} {
			if d.Verdict != Allow && d.Verdict != Deny {
				t.Fatalf("verdict %q", d.Verdict)
			}
			if len(d.Steps) == 0 || d.Reason == "" {
				t.Fatalf("decision without steps or reason: %+v", d)
			}
			_ = d.Text()
		}
	}
}

// FuzzDecode feeds arbitrary bytes to the policy decoding and compilation
// (the agent reads the same objects through agent/k8s): it must never panic,
// and whatever it accepts must build a snapshot that decides every flow.
func FuzzDecode(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		in := shopInput()
		err := decodePolicies("fuzz", data, &in)
		if err != nil && err.Error() == "" {
			t.Fatal("empty error message")
		}
		// Everything Decode accepted must be valid for the engine.
		for _, np := range in.NetworkPolicies {
			if err := ValidateNetworkPolicy(np); err != nil {
				t.Fatalf("Decode accepted an invalid NetworkPolicy: %v", err)
			}
		}
		for _, ap := range in.AuthorizationPolicies {
			if err := ValidateAuthorizationPolicy(ap); err != nil {
				t.Fatalf("Decode accepted an invalid AuthorizationPolicy: %v", err)
			}
		}
		s := NewSnapshot(1, in, Options{})
		if p := s.Problems(); len(p) > 0 {
			t.Fatalf("Decode accepted objects the snapshot refuses: %v", p)
		}
		checkSnapshot(t, in)
	})
}

// FuzzUnvalidatedPolicies builds snapshots from policies that skipped
// validation (as the agent may see them from the API server): the engine must
// refuse them without panicking and keep deciding.
func FuzzUnvalidatedPolicies(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		in := shopInput()
		for _, doc := range strings.Split(string(data), "\n---") {
			var np networkingv1.NetworkPolicy
			if yaml.Unmarshal([]byte(doc), &np) == nil {
				in.NetworkPolicies = append(in.NetworkPolicies, &np)
			}
			var ap v1alpha1.AuthorizationPolicy
			if yaml.Unmarshal([]byte(doc), &ap) == nil {
				in.AuthorizationPolicies = append(in.AuthorizationPolicies, &ap)
			}
			var pa v1alpha1.PeerAuthentication
			if yaml.Unmarshal([]byte(doc), &pa) == nil {
				in.PeerAuthentications = append(in.PeerAuthentications, &pa)
			}
		}
		checkSnapshot(t, in)
	})
}
