package spec

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

const base = `
nodes:
  - name: node-1
  - name: node-2
namespaces:
  - name: shop
pods:
  - name: web-1
    namespace: shop
    node: node-1
    labels: {app: web}
    command: [nodemeshctl, lab, workload, http, --port, "8080"]
    ports: [{name: http, containerPort: 8080}]
services:
  - name: web
    namespace: shop
    selector: {app: web}
    ports: [{port: 80, targetPort: http}]
`

func TestParseDefaults(t *testing.T) {
	s, err := Parse("base.yaml", []byte(base))
	if err != nil {
		t.Fatal(err)
	}
	n1, _ := s.Node("node-1")
	n2, _ := s.Node("node-2")
	if n1.IP != "10.250.0.1" || n2.IP != "10.250.0.2" {
		t.Errorf("node IPs = %s, %s; want 10.250.0.1, 10.250.0.2", n1.IP, n2.IP)
	}
	if n1.PodCIDR != "10.244.1.0/24" || n2.PodCIDR != "10.244.2.0/24" {
		t.Errorf("pod CIDRs = %s, %s", n1.PodCIDR, n2.PodCIDR)
	}
	p, ok := s.Pod("shop/web-1")
	if !ok {
		t.Fatal("pod shop/web-1 missing")
	}
	if p.ServiceAccount != "default" || p.Ports[0].Protocol != "TCP" {
		t.Errorf("pod defaults: sa=%q proto=%q", p.ServiceAccount, p.Ports[0].Protocol)
	}
	sp := s.Services[0].Ports[0]
	if sp.Protocol != "TCP" || sp.TargetPort.StrVal != "http" {
		t.Errorf("service port defaults: %+v", sp)
	}
	if port, ok := sp.ResolvePort(p); !ok || port != 8080 {
		t.Errorf("ResolvePort = %d, %v; want 8080", port, ok)
	}
}

func TestExampleParses(t *testing.T) {
	b, err := os.ReadFile("../examples/two-nodes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s, err := Parse("two-nodes.yaml", b)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Nodes) != 2 || len(s.Namespaces) < 2 || len(s.Pods) < 4 || len(s.Services) != 2 {
		t.Errorf("example has %d nodes, %d namespaces, %d pods, %d services; want 2, 2+, 4+, 2", len(s.Nodes), len(s.Namespaces), len(s.Pods), len(s.Services))
	}
}

// TestValidation feeds broken specs and checks that each is refused with
// the field and a message an operator can act on.
func TestValidation(t *testing.T) {
	cases := []struct {
		name  string
		edit  func(string) string
		yaml  string // used instead of edit(base) when set
		field string // expected Error.Field
		msg   string // substring of the message
	}{
		{name: "unknown top-level field", edit: func(s string) string { return s + "extra: 1\n" }, field: "extra", msg: "unknown field"},
		{name: "misspelt pod field", edit: func(s string) string { return strings.Replace(s, "command:", "comand:", 1) }, field: "pods[0].comand", msg: "unknown field"},
		{name: "duplicate YAML key", edit: func(s string) string { return strings.Replace(s, "node: node-1", "node: node-1\n    node: node-2", 1) }, msg: "not valid YAML"},
		{name: "wrong type", edit: func(s string) string { return strings.Replace(s, "containerPort: 8080", "containerPort: http", 1) }, field: "pods[0].ports[0].containerPort", msg: "want a number"},
		{name: "boolean label value", edit: func(s string) string {
			return strings.Replace(s, "{app: web}\n    command", "{app: true}\n    command", 1)
		}, field: `pods[0].labels["app"]`, msg: "want a string"},
		{name: "duplicate pod", edit: func(s string) string {
			return strings.Replace(s, "services:", `  - name: web-1
    namespace: shop
    node: node-2
    command: [sleep, "1"]
services:`, 1)
		}, field: "pods[1].name", msg: "duplicate pod shop/web-1"},
		{name: "unknown node", edit: func(s string) string { return strings.Replace(s, "node: node-1", "node: node-9", 1) }, field: "pods[0].node", msg: `node "node-9" is not declared`},
		{name: "missing node", edit: func(s string) string { return strings.Replace(s, "    node: node-1\n", "", 1) }, field: "pods[0].node", msg: "no node"},
		{name: "unknown namespace", edit: func(s string) string { return strings.Replace(s, "namespaces:\n  - name: shop\n", "", 1) }, field: "pods[0].namespace", msg: `namespace "shop" is not declared`},
		{name: "overlapping pod CIDRs", edit: func(s string) string {
			return strings.Replace(s, "  - name: node-2\n", "  - name: node-2\n    podCIDR: 10.244.1.128/25\n", 1)
		}, field: "nodes[1].podCIDR", msg: "overlaps nodes[0].podCIDR"},
		{name: "pod CIDR overlaps service CIDR", edit: func(s string) string {
			return strings.Replace(s, "  - name: node-2\n", "  - name: node-2\n    podCIDR: 10.96.5.0/24\n", 1)
		}, field: "nodes[1].podCIDR", msg: "overlaps network.serviceCIDR"},
		{name: "underlay overlaps pod CIDR", yaml: "network: {underlay: 10.244.0.0/16, clusterCIDR: 10.200.0.0/16}\nnodes: [{name: a, podCIDR: 10.244.3.0/24, ip: 10.244.0.5}]\n", field: "nodes[0].podCIDR", msg: "overlaps network.underlay"},
		{name: "host bits in CIDR", edit: func(s string) string {
			return strings.Replace(s, "  - name: node-2\n", "  - name: node-2\n    podCIDR: 10.244.9.1/24\n", 1)
		}, field: "nodes[1].podCIDR", msg: "host bits"},
		{name: "node IP outside underlay", edit: func(s string) string {
			return strings.Replace(s, "  - name: node-2\n", "  - name: node-2\n    ip: 192.168.1.1\n", 1)
		}, field: "nodes[1].ip", msg: "outside network.underlay"},
		{name: "duplicate node IP", edit: func(s string) string {
			return strings.Replace(s, "  - name: node-2\n", "  - name: node-2\n    ip: 10.250.0.1\n", 1)
		}, field: "nodes[1].ip", msg: "also the address of node"},
		{name: "duplicate node", edit: func(s string) string { return strings.Replace(s, "name: node-2", "name: node-1", 1) }, field: "nodes[1].name", msg: "duplicate node name"},
		{name: "bad node name", edit: func(s string) string { return strings.Replace(s, "name: node-2", "name: Node_2", 1) }, field: "nodes[1].name", msg: "not a valid node name"},
		{name: "no nodes", yaml: "pods: []\n", field: "nodes", msg: "no nodes"},
		{name: "node full", yaml: "nodes: [{name: a, podCIDR: 10.9.0.0/28}]\npods:\n" + manyPods(14), field: "pods[13].node", msg: "room for 13 pods"},
		{name: "service selects nothing", edit: func(s string) string { return strings.Replace(s, "selector: {app: web}", "selector: {app: db}", 1) }, field: "services[0].selector", msg: "selects no pod"},
		{name: "service without selector", edit: func(s string) string { return strings.Replace(s, "    selector: {app: web}\n", "", 1) }, field: "services[0].selector", msg: "no selector"},
		{name: "bad service port", edit: func(s string) string { return strings.Replace(s, "port: 80,", "port: 70000,", 1) }, field: "services[0].ports[0].port", msg: "not a port number"},
		{name: "bad container port", edit: func(s string) string { return strings.Replace(s, "containerPort: 8080", "containerPort: 0", 1) }, field: "pods[0].ports[0].containerPort", msg: "not a port number"},
		{name: "bad target port number", edit: func(s string) string { return strings.Replace(s, "targetPort: http", "targetPort: 99999", 1) }, field: "services[0].ports[0].targetPort", msg: "not a port number"},
		{name: "unresolvable named target port", edit: func(s string) string { return strings.Replace(s, "targetPort: http", "targetPort: grpc", 1) }, field: "services[0].ports[0].targetPort", msg: `named "grpc"`},
		{name: "bad protocol", edit: func(s string) string { return strings.Replace(s, "{port: 80,", "{protocol: ICMP, port: 80,", 1) }, field: "services[0].ports[0].protocol", msg: "not supported"},
		{name: "empty command", edit: func(s string) string {
			return strings.Replace(s, `command: [nodemeshctl, lab, workload, http, --port, "8080"]`, "command: []", 1)
		}, field: "pods[0].command", msg: "no command"},
		{name: "reserved annotation", edit: func(s string) string {
			return strings.Replace(s, "labels: {app: web}\n    command", "labels: {app: web}\n    annotations: {lab.nodemesh.io/netns: x}\n    command", 1)
		}, field: `pods[0].annotations["lab.nodemesh.io/netns"]`, msg: "written by the lab"},
		{name: "wrong kind", edit: func(s string) string { return "kind: Pod\n" + s }, field: "kind", msg: "not supported"},
		{name: "not yaml", yaml: "nodes: [", msg: "not valid YAML"},
		{name: "empty", yaml: "   \n", msg: "spec is empty"},
		{name: "scalar document", yaml: "42\n", msg: "want a mapping"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			y := tc.yaml
			if y == "" {
				y = tc.edit(base)
			}
			_, err := Parse("lab.yaml", []byte(y))
			if err == nil {
				t.Fatalf("spec accepted:\n%s", y)
			}
			if !strings.HasPrefix(err.Error(), "lab.yaml: ") {
				t.Errorf("error does not name the file: %v", err)
			}
			found := false
			for _, e := range unjoin(err) {
				var se *Error
				if !errors.As(e, &se) {
					t.Errorf("error %v is not a *spec.Error", e)
					continue
				}
				if (tc.field == "" || se.Field == tc.field) && strings.Contains(se.Msg, tc.msg) {
					found = true
				}
			}
			if !found {
				t.Errorf("want an error on field %q containing %q, got:\n%v", tc.field, tc.msg, err)
			}
		})
	}
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

func TestErrorsHaveFixes(t *testing.T) {
	_, err := Parse("lab.yaml", []byte(strings.Replace(base, "node: node-1", "node: node-9", 1)))
	if err == nil || !strings.Contains(err.Error(), "use one of: node-1, node-2") {
		t.Errorf("error should say what to use instead: %v", err)
	}
}

func TestReportsAllProblems(t *testing.T) {
	y := strings.Replace(strings.Replace(base, "node: node-1", "node: node-9", 1), "selector: {app: web}", "selector: {app: db}", 1)
	_, err := Parse("lab.yaml", []byte(y))
	if n := len(unjoin(err)); n < 2 {
		t.Errorf("want both problems reported, got %d: %v", n, err)
	}
}

func TestSelects(t *testing.T) {
	p := &Pod{Namespace: "a", Labels: map[string]string{"app": "web", "tier": "x"}}
	cases := []struct {
		svc  Service
		want bool
	}{
		{Service{Namespace: "a", Selector: map[string]string{"app": "web"}}, true},
		{Service{Namespace: "a", Selector: map[string]string{"app": "web", "tier": "y"}}, false},
		{Service{Namespace: "b", Selector: map[string]string{"app": "web"}}, false},
		{Service{Namespace: "a"}, false},
	}
	for i, c := range cases {
		if got := c.svc.Selects(p); got != c.want {
			t.Errorf("case %d: Selects = %v, want %v", i, got, c.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(base))
	if b, err := os.ReadFile("../examples/two-nodes.yaml"); err == nil {
		f.Add(b)
	}
	f.Add([]byte("nodes: [{name: a}]\npods: [{name: p, node: a, command: [x], ports: [{containerPort: 1}]}]"))
	f.Add([]byte("{\"nodes\": [{\"name\": \"a\", \"podCIDR\": \"10.0.0.0/8\"}]}"))
	f.Add([]byte("services: [{name: s, ports: [{port: 1, targetPort: x}], selector: {a: b}}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse("fuzz.yaml", data)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz.yaml: ") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		// Whatever parses must validate again unchanged (defaults are
		// idempotent) and be usable.
		s.Default()
		if err := s.Validate("again"); err != nil {
			t.Fatalf("accepted spec fails validation after re-defaulting: %v", err)
		}
		for i := range s.Pods {
			if _, ok := s.Node(s.Pods[i].Node); !ok {
				t.Fatalf("accepted pod %s on unknown node %q", s.Pods[i].Key(), s.Pods[i].Node)
			}
		}
	})
}

func manyPods(n int) string {
	var b strings.Builder
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "  - {name: p%d, node: a, command: [x]}\n", i)
	}
	return b.String()
}
