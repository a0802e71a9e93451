package policy

// Table tests porting the scenarios of the upstream Kubernetes NetworkPolicy
// e2e suite (test/e2e/network/netpol): namespaces x, y, z, each with pods a,
// b, c serving ports 80 and 81 over TCP, UDP and SCTP; each step states the
// policies in force and the expected 9x9 reachability truth table, built
// from "all allowed" by applying expectation lines in order. Loopback cells
// (a pod to itself) are not checked, as upstream does not check them.

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

var (
	e2eNamespaces = []string{"x", "y", "z"}
	e2ePods       = []string{"a", "b", "c"}
)

// e2eIP gives x/a 10.1.0.1, y/b 10.2.0.2, ... (all inside 0.0.0.0/4, the
// "large CIDR" upstream derives from a pod IP).
func e2eIP(ns, pod string) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(1 + strings.Index("xyz", ns)), 0, byte(1 + strings.Index("abc", pod))})
}

func e2eInput(nsLabels map[string]map[string]string, podLabels map[string]map[string]string) Input {
	var in Input
	for _, ns := range e2eNamespaces {
		l := map[string]string{"ns": ns}
		for k, v := range nsLabels[ns] {
			l[k] = v
		}
		in.Namespaces = append(in.Namespaces, Namespace{Name: ns, Labels: l})
		for _, p := range e2ePods {
			pl := map[string]string{"pod": p}
			for k, v := range podLabels[ns+"/"+p] {
				pl[k] = v
			}
			pod := Pod{Namespace: ns, Name: p, Labels: pl, IPs: []netip.Addr{e2eIP(ns, p)}, ServiceAccount: "default", Node: "node-1"}
			for _, port := range []int32{80, 81} {
				for _, proto := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP} {
					pod.Ports = append(pod.Ports, ContainerPort{Name: fmt.Sprintf("serve-%d-%s", port, strings.ToLower(string(proto))), Port: port, Protocol: proto})
				}
			}
			in.Pods = append(in.Pods, pod)
		}
	}
	return in
}

// np renders a NetworkPolicy document; spec is indented YAML under "spec:".
func np(ns, name, spec string) string {
	return fmt.Sprintf("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  namespace: %q\n  name: %q\nspec:\n%s\n---\n", ns, name, indent(spec, "  "))
}

func indent(s, pfx string) string {
	lines := strings.Split(strings.Trim(s, "\n"), "\n")
	// Strip the common leading tabs of the Go raw string.
	for i, l := range lines {
		lines[i] = pfx + strings.TrimLeft(l, "\t")
	}
	return strings.Join(lines, "\n")
}

// truth is a 9x9 table indexed [from][to] in the order x/a x/b x/c y/a ... z/c.
type truth [9][9]bool

func matchPattern(pat string, idx int) bool {
	if pat == "*" {
		return true
	}
	ns, p, _ := strings.Cut(pat, "/")
	if ns != e2eNamespaces[idx/3] {
		return false
	}
	return p == "*" || p == e2ePods[idx%3]
}

// expectTable applies lines like "x/* -> y/a: deny" to an all-allowed table.
func expectTable(t *testing.T, lines []string) truth {
	t.Helper()
	var tt truth
	for i := range tt {
		for j := range tt[i] {
			tt[i][j] = true
		}
	}
	for _, l := range lines {
		lhs, verdict, ok := strings.Cut(l, ":")
		from, to, ok2 := strings.Cut(lhs, "->")
		verdict = strings.TrimSpace(verdict)
		if !ok || !ok2 || (verdict != "allow" && verdict != "deny") {
			t.Fatalf("bad expectation %q", l)
		}
		from, to = strings.TrimSpace(from), strings.TrimSpace(to)
		for i := 0; i < 9; i++ {
			for j := 0; j < 9; j++ {
				if matchPattern(from, i) && matchPattern(to, j) {
					tt[i][j] = verdict == "allow"
				}
			}
		}
	}
	return tt
}

func (tt truth) String() string {
	var b strings.Builder
	b.WriteString("from\\to")
	for _, ns := range e2eNamespaces {
		for _, p := range e2ePods {
			b.WriteString("\t" + ns + "/" + p)
		}
	}
	b.WriteString("\n")
	for i := 0; i < 9; i++ {
		b.WriteString(e2eNamespaces[i/3] + "/" + e2ePods[i%3])
		for j := 0; j < 9; j++ {
			c := "."
			if !tt[i][j] {
				c = "X"
			}
			if i == j {
				c = "-"
			}
			b.WriteString("\t" + c)
		}
		b.WriteString("\n")
	}
	return b.String()
}

type e2eStep struct {
	policies  string
	nsLabels  map[string]map[string]string
	podLabels map[string]map[string]string
	port      uint16
	proto     corev1.Protocol
	expect    []string
}

type e2eCase struct {
	name  string
	steps []e2eStep
}

func tcp(port uint16, policies string, expect ...string) e2eStep {
	return e2eStep{policies: policies, port: port, proto: corev1.ProtocolTCP, expect: expect}
}

func withProto(s e2eStep, p corev1.Protocol) e2eStep { s.proto = p; return s }

const (
	denyIngressX = `
podSelector: {}
policyTypes: [Ingress]`
	denyAllX = `
podSelector: {}
policyTypes: [Ingress, Egress]`
	portsPolicy81 = `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "y"}}
  ports:
  - {port: 81, protocol: PROTO}`
	nsAndPodPolicy = `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "y"}}
    podSelector: {matchLabels: {pod: a}}`
)

func e2eCases() []e2eCase {
	var (
		portsDeny  = []string{"x/* -> x/a: deny", "z/* -> x/a: deny"}
		onlyYtoXA  = []string{"* -> x/a: deny", "y/a -> x/a: allow"}
		exceptXB   = np("x", "allow-client-a-via-cidr-egress-rule", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 0.0.0.0/4, except: [10.1.0.2/32]}")
		stacked81  = np("x", "allow-client-a-via-ns-selector", strings.ReplaceAll(portsPolicy81, "PROTO", "TCP"))
		ingressXAB = `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - podSelector: {matchLabels: {pod: b}}`
	)
	return []e2eCase{
		{"default-deny-ingress", []e2eStep{tcp(80, np("x", "deny-ingress", denyIngressX), "* -> x/*: deny")}},
		{"default-deny-all", []e2eStep{tcp(80, np("x", "deny-all", denyAllX), "* -> x/*: deny", "x/* -> *: deny")}},
		{"allow from pods within server namespace based on PodSelector", []e2eStep{tcp(80, np("x", "x-a-allows-x-b", ingressXAB), "* -> x/a: deny", "x/b -> x/a: allow")}},
		{"allow ingress traffic for a target", []e2eStep{tcp(80, np("x", "deny-all", denyIngressX)+np("x", "allow-all-to-a", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - podSelector: {}
    namespaceSelector: {}`), "* -> x/b: deny", "* -> x/c: deny")}},
		{"allow ingress from pods in all namespaces", []e2eStep{tcp(80, np("x", "allow-from-another-ns", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchLabels: {}}`))}},
		{"allow only from a different namespace by NamespaceSelector", []e2eStep{tcp(80, np("x", "allow-client-a-via-ns-selector", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "y"}}`), portsDeny...)}},
		{"PodSelector with MatchExpressions", []e2eStep{tcp(80, np("x", "x-a-allows-x-b", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}`), "* -> x/a: deny", "x/b -> x/a: allow")}},
		{"NamespaceSelector with MatchExpressions", []e2eStep{tcp(80, np("x", "allow-ns-y-match-selector", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: ["y"]}]}`), portsDeny...)}},
		{"PodSelector or NamespaceSelector", []e2eStep{tcp(80, np("x", "allow-ns-y-match-selector", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ["x"]}]}
  - podSelector: {matchLabels: {pod: b}}`), "x/c -> x/a: deny")}},
		{"PodSelector and NamespaceSelector", []e2eStep{tcp(80, np("x", "allow-ns-y-podselector-and-nsselector", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ["x"]}]}
    podSelector: {matchLabels: {pod: b}}`), "* -> x/a: deny", "y/b -> x/a: allow", "z/b -> x/a: allow")}},
		{"multiple PodSelectors and NamespaceSelectors", []e2eStep{tcp(80, np("x", "allow-ns-y-z-pod-b-c", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ["x"]}]}
    podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}`), "x/* -> x/a: deny", "y/a -> x/a: deny", "z/a -> x/a: deny")}},
		{"any PodSelectors", []e2eStep{tcp(80, np("x", "allow-ns-x-pod-b-c", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - podSelector: {matchLabels: {pod: b}}
  - podSelector: {matchLabels: {pod: c}}`), "* -> x/a: deny", "x/b -> x/a: allow", "x/c -> x/a: allow")}},
		{"only from a pod in a different namespace (TCP)", []e2eStep{tcp(80, np("x", "allow-ns-y-pod-a-via-namespace-pod-selector", nsAndPodPolicy), onlyYtoXA...)}},
		{"only from a pod in a different namespace (UDP)", []e2eStep{withProto(tcp(80, np("x", "allow-ns-y-pod-a-via-namespace-pod-selector", nsAndPodPolicy), onlyYtoXA...), corev1.ProtocolUDP)}},
		{"only from a pod in a different namespace (SCTP)", []e2eStep{withProto(tcp(80, np("x", "allow-ns-y-pod-a-via-namespace-pod-selector", nsAndPodPolicy), onlyYtoXA...), corev1.ProtocolSCTP)}},
		{"Ports (TCP)", []e2eStep{tcp(81, stacked81, portsDeny...), tcp(80, stacked81, "* -> x/a: deny")}},
		{"Ports (UDP)", []e2eStep{withProto(tcp(81, np("x", "allow-ingress-on-port-81-ns-x", strings.ReplaceAll(portsPolicy81, "PROTO", "UDP")), portsDeny...), corev1.ProtocolUDP)}},
		{"Ports (SCTP)", []e2eStep{withProto(tcp(81, np("x", "allow-ingress-on-port-81-ns-x", strings.ReplaceAll(portsPolicy81, "PROTO", "SCTP")), portsDeny...), corev1.ProtocolSCTP)}},
		{"multiple stacked policies with overlapping podSelectors", []e2eStep{
			tcp(81, stacked81, portsDeny...),
			tcp(80, stacked81, "* -> x/a: deny"),
			tcp(80, stacked81+np("x", "allow-client-a-via-ns-selector-80", strings.ReplaceAll(strings.ReplaceAll(portsPolicy81, "PROTO", "TCP"), "81", "80")), portsDeny...),
		}},
		{"allow-all policy", []e2eStep{
			tcp(80, np("x", "allow-all", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- {}")),
			tcp(81, np("x", "allow-all", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- {}")),
		}},
		{"ingress access on one named port", []e2eStep{
			tcp(81, np("x", "allow-all", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- ports: [{port: serve-81-tcp}]")),
			tcp(80, np("x", "allow-all", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- ports: [{port: serve-81-tcp}]"), "* -> x/*: deny"),
		}},
		{"ingress access from namespace on one named port", []e2eStep{
			tcp(80, np("x", "allow-client-a-via-ns-selector-80", strings.ReplaceAll(strings.ReplaceAll(portsPolicy81, "81", "serve-80-tcp"), "PROTO", "TCP")), portsDeny...),
			tcp(81, np("x", "allow-client-a-via-ns-selector-80", strings.ReplaceAll(strings.ReplaceAll(portsPolicy81, "81", "serve-80-tcp"), "PROTO", "TCP")), "* -> x/a: deny"),
		}},
		{"egress access on one named port", []e2eStep{
			tcp(80, np("x", "allow-egress", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- ports: [{port: serve-80-tcp}]")),
			tcp(81, np("x", "allow-egress", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- ports: [{port: serve-80-tcp}]"), "x/* -> *: deny"),
		}},
		{"updated policy", []e2eStep{
			tcp(81, np("x", "allow-all-mutate-to-deny-all", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- {}")),
			tcp(81, np("x", "allow-all-mutate-to-deny-all", "podSelector: {}\npolicyTypes: [Ingress]\ningress: []"), "* -> x/*: deny"),
		}},
		{"ingress access from updated namespace", func() []e2eStep {
			pol := np("x", "allow-client-a-via-ns-selector", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns2: updated}}")
			s2 := tcp(80, pol, "* -> x/a: deny", "y/* -> *: allow")
			s2.nsLabels = map[string]map[string]string{"y": {"ns2": "updated"}}
			return []e2eStep{tcp(80, pol, "* -> x/a: deny"), s2}
		}()},
		{"ingress access from updated pod", func() []e2eStep {
			pol := np("x", "allow-client-a-via-pod-selector", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b, pod2: updated}}")
			s2 := tcp(80, pol, "* -> x/a: deny", "x/b -> x/a: allow")
			s2.podLabels = map[string]map[string]string{"x/b": {"pod2": "updated"}}
			return []e2eStep{tcp(80, pol, "* -> x/a: deny"), s2}
		}()},
		{"deny ingress from pods on other namespaces", []e2eStep{tcp(80, np("x", "deny-empty-policy", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - podSelector: {matchLabels: {}}"), "y/* -> x/*: deny", "z/* -> x/*: deny")}},
		{"deny ingress access to updated pod", func() []e2eStep {
			pol := np("x", "deny-ingress-via-label-selector", "podSelector: {matchLabels: {target: isolated}}\npolicyTypes: [Ingress]")
			s2 := tcp(80, pol, "* -> x/a: deny")
			s2.podLabels = map[string]map[string]string{"x/a": {"target": "isolated"}}
			return []e2eStep{tcp(80, pol), s2}
		}()},
		{"deny egress from pods based on PodSelector", []e2eStep{tcp(80, np("x", "deny-egress-pod-a", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]"), "x/a -> *: deny")}},
		{"deny egress from all pods in a namespace", []e2eStep{tcp(80, np("x", "deny-egress-ns-x", "podSelector: {}\npolicyTypes: [Egress]"), "x/* -> *: deny")}},
		{"Ingress and Egress specified together", func() []e2eStep {
			pol := np("x", "allow-client-a-via-pod-selector", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress, Ingress]
ingress:
- from:
  - podSelector: {matchLabels: {pod: b}}
egress:
- ports: [{port: 80}]`)
			return []e2eStep{
				tcp(80, pol, "* -> x/a: deny", "x/b -> x/a: allow"),
				tcp(81, pol, "* -> x/a: deny", "x/a -> *: deny", "x/b -> x/a: allow"),
			}
		}()},
		{"denying egress on the client side even if the server allows it", []e2eStep{tcp(80,
			np("x", "allow-to-ns-y-pod-a", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- to:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "y"}}
    podSelector: {matchLabels: {pod: a}}`)+
				np("y", "allow-from-xa-on-ya-match-selector", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "x"}}
    podSelector: {matchLabels: {pod: a}}`)+
				np("y", "allow-from-xa-on-yb-match-selector", `
podSelector: {matchLabels: {pod: b}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "x"}}
    podSelector: {matchLabels: {pod: a}}`),
			"x/a -> *: deny", "* -> y/a: deny", "x/a -> y/a: allow", "* -> y/b: deny")}},
		{"egress to a server in a different namespace by PodSelector and NamespaceSelector", []e2eStep{tcp(80, np("x", "allow-to-ns-y-pod-a", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- to:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "y"}}
    podSelector: {matchLabels: {pod: a}}`), "x/a -> *: deny", "x/a -> y/a: allow")}},
		{"ingress allowing any port on a specific protocol", func() []e2eStep {
			pol := np("x", "allow-ingress-by-proto", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]\ningress:\n- ports: [{protocol: TCP}]")
			return []e2eStep{tcp(80, pol), withProto(tcp(80, pol, "* -> x/a: deny"), corev1.ProtocolUDP)}
		}()},
		{"multiple ingress policies with allow-all taking precedence", func() []e2eStep {
			p80 := np("x", "allow-ingress-port-80", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- ports: [{port: 80}]")
			return []e2eStep{
				tcp(81, p80, "* -> x/*: deny"),
				tcp(81, p80+np("x", "allow-ingress", "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- {}")),
			}
		}()},
		{"multiple egress policies with allow-all taking precedence", func() []e2eStep {
			p80 := np("x", "allow-egress-port-80", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- ports: [{port: 80}]")
			return []e2eStep{
				tcp(81, p80, "x/* -> *: deny"),
				tcp(81, p80+np("x", "allow-egress", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- {}")),
			}
		}()},
		{"stop enforcing policies after they are deleted", []e2eStep{
			tcp(80, np("x", "deny-all", denyAllX), "x/* -> *: deny", "* -> x/*: deny"),
			tcp(80, ""),
		}},
		{"egress access to server in CIDR block", []e2eStep{tcp(80, np("x", "allow-client-a-via-cidr-egress-rule", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 10.2.0.2/32}"), "x/a -> *: deny", "x/a -> y/b: allow")}},
		{"except clause while egress access to server in CIDR block", []e2eStep{tcp(80, exceptXB, "x/a -> x/b: deny")}},
		{"IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", []e2eStep{
			tcp(80, exceptXB, "x/a -> x/b: deny"),
			tcp(80, np("x", "allow-client-a-via-cidr-egress-rule", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 10.1.0.2/32}"), "x/a -> *: deny", "x/a -> x/b: allow"),
		}},
		{"ingress and egress controlled independently by PodSelector", func() []e2eStep {
			eg := np("x", "allow-egress-for-target", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- {}")
			return []e2eStep{
				tcp(80, eg),
				tcp(80, eg+np("x", "deny-ingress-via-label-selector", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]"), "* -> x/a: deny"),
			}
		}()},
		{"SCTP is not mistaken for TCP", []e2eStep{tcp(81, np("x", "deny-ingress", denyIngressX)+np("x", "allow-only-sctp-ingress-on-port-81", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]\ningress:\n- ports: [{port: 81, protocol: SCTP}]"), "* -> x/*: deny")}},
		{"pods selected by a policy allowing only SCTP are isolated for TCP", []e2eStep{tcp(81, np("x", "allow-only-sctp-ingress-on-port-80", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]\ningress:\n- ports: [{port: 80, protocol: SCTP}]"), "* -> x/a: deny")}},
		{"no TCP when a policy specifies only UDP", []e2eStep{tcp(81, np("x", "allow-only-udp-ingress-on-port-81", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]\ningress:\n- ports: [{port: 81, protocol: UDP}]"), "* -> x/a: deny")}},
		{"NamespaceSelector MatchLabels on the default namespace label", []e2eStep{tcp(80, np("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "y"}}`), portsDeny...)}},
		{"NamespaceSelector MatchExpressions on the default namespace label (egress)", []e2eStep{tcp(80, np("x", "allow-ns-y-match-selector-for-immutable-ns-label", `
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- to:
  - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ["y"]}]}`), "x/a -> y/*: deny")}},
		{"default-deny-ingress (UDP)", []e2eStep{withProto(tcp(80, np("x", "deny-all", denyIngressX), "* -> x/*: deny"), corev1.ProtocolUDP)}},
		{"default-deny-ingress (SCTP)", []e2eStep{withProto(tcp(80, np("x", "deny-all", denyIngressX), "* -> x/*: deny"), corev1.ProtocolSCTP)}},

		// Beyond the upstream suite: policyTypes defaulting, endPort, Exists/DoesNotExist.
		{"policyTypes omitted: ingress only when there are no egress rules", []e2eStep{tcp(80, np("x", "implicit-ingress", "podSelector: {matchLabels: {pod: a}}"), "* -> x/a: deny")}},
		{"policyTypes omitted: egress rules make it an egress policy too", []e2eStep{
			tcp(80, np("x", "implicit-both", "podSelector: {matchLabels: {pod: a}}\negress:\n- ports: [{port: 81}]"), "* -> x/a: deny", "x/a -> *: deny"),
			tcp(81, np("x", "implicit-both", "podSelector: {matchLabels: {pod: a}}\negress:\n- ports: [{port: 81}]"), "* -> x/a: deny"),
		}},
		{"endPort range", []e2eStep{
			tcp(80, np("x", "egress-range", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: 81, endPort: 90}]"), "x/a -> *: deny"),
			tcp(81, np("x", "egress-range", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: 81, endPort: 90}]")),
			tcp(80, np("x", "egress-range", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: 79, endPort: 80}]")),
		}},
		{"Exists and DoesNotExist", func() []e2eStep {
			pol := np("x", "exists", `
podSelector: {matchExpressions: [{key: pod, operator: Exists}]}
policyTypes: [Ingress]
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}
    podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [c]}]}`)
			s := tcp(80, pol, "z/* -> x/*: deny", "* -> x/*: deny", "x/a -> x/*: allow", "x/b -> x/*: allow", "y/a -> x/*: allow", "y/b -> x/*: allow")
			s.nsLabels = map[string]map[string]string{"z": {"team": "blue"}}
			return []e2eStep{s}
		}()},
	}
}

func TestNetworkPolicyE2ETruthTables(t *testing.T) {
	for _, tc := range e2eCases() {
		t.Run(tc.name, func(t *testing.T) {
			for si, st := range tc.steps {
				in := e2eInput(st.nsLabels, st.podLabels)
				if err := decodePolicies("case", []byte(st.policies), &in); err != nil {
					t.Fatalf("step %d: decoding policies: %v", si, err)
				}
				snap := NewSnapshot(uint64(si+1), in, Options{})
				if p := snap.Problems(); len(p) > 0 {
					t.Fatalf("step %d: problems: %v", si, p)
				}
				want := expectTable(t, st.expect)
				for _, mode := range []string{"plaintext", "hbone"} {
					var got truth
					for i := 0; i < 9; i++ {
						for j := 0; j < 9; j++ {
							srcNS, srcPod := e2eNamespaces[i/3], e2ePods[i%3]
							f := Flow{
								Src: e2eIP(srcNS, srcPod), Dst: e2eIP(e2eNamespaces[j/3], e2ePods[j%3]),
								Port: st.port, Protocol: st.proto,
							}
							if mode == "hbone" && st.proto == corev1.ProtocolTCP {
								f.Principal = "spiffe://cluster.local/ns/" + srcNS + "/sa/default"
							}
							got[i][j] = snap.Decide(f).Allowed()
						}
					}
					// Loopback is not checked.
					for i := 0; i < 9; i++ {
						got[i][i], want[i][i] = false, false
					}
					if got != want {
						t.Errorf("step %d (%s port %d/%s): reachability differs\nwant:\n%s\ngot:\n%s", si, mode, st.port, st.proto, want, got)
					}
				}
			}
		})
	}
}
