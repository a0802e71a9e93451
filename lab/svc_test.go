package lab

import (
	"strings"
	"testing"

	"github.com/nodemesh/nodemesh/lab/examples"
)

// testLab returns a lab value (no kernel objects) running the example with
// made-up pod IPs and ClusterIPs.
func testLab(t *testing.T) *Lab {
	t.Helper()
	sp, err := examples.TwoNodesSpec()
	if err != nil {
		t.Fatal(err)
	}
	st := &state{ID: "u", Spec: sp, Nodes: map[string]*Node{}, Pods: map[string]*Pod{}, Services: map[string]*Service{}}
	l, err := newLab(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, sn := range sp.Nodes {
		gw, _ := gatewayOf(sn.PodCIDR)
		st.Nodes[sn.Name] = &Node{Name: sn.Name, Index: i, IP: sn.IP, PodCIDR: sn.PodCIDR, Gateway: gw}
	}
	for i := range sp.Pods {
		sp := &sp.Pods[i]
		idx, ip, err := l.allocPod(st.Nodes[sp.Node])
		if err != nil {
			t.Fatal(err)
		}
		st.Pods[sp.Key()] = &Pod{Namespace: sp.Namespace, Name: sp.Name, Node: sp.Node, Index: idx, IP: ip, Labels: sp.Labels}
	}
	st.Services["shop/web"] = &Service{Namespace: "shop", Name: "web", ClusterIP: "10.96.0.50", Ports: sp.Services[0].Ports}
	st.Services["shop/echo"] = &Service{Namespace: "shop", Name: "echo", ClusterIP: "10.96.0.51", Ports: sp.Services[1].Ports}
	return l
}

func TestAllocPod(t *testing.T) {
	l := testLab(t)
	want := map[string]string{
		"shop/web-1": "10.244.1.2", "client/client-1": "10.244.1.3",
		"shop/web-2": "10.244.2.2", "shop/echo-1": "10.244.2.3", "client/client-2": "10.244.2.4",
	}
	for k, ip := range want {
		if got := l.st.Pods[k].IP; got != ip {
			t.Errorf("%s got %s, want %s", k, got, ip)
		}
	}
	// A freed index is reused, the gateway (.1) never handed out.
	delete(l.st.Pods, "shop/web-2")
	if idx, ip, _ := l.allocPod(l.st.Nodes["node-2"]); idx != 0 || ip != "10.244.2.2" {
		t.Errorf("after freeing web-2: %d %s", idx, ip)
	}
	if l.st.Nodes["node-1"].Gateway != "10.244.1.1" {
		t.Errorf("gateway %s", l.st.Nodes["node-1"].Gateway)
	}
	// A full /28 refuses the next pod.
	n := &Node{Name: "tiny", PodCIDR: "10.9.0.0/28"}
	for i := 0; i < 13; i++ {
		idx, ip, err := l.allocPod(n)
		if err != nil {
			t.Fatalf("pod %d: %v", i, err)
		}
		l.st.Pods[ip] = &Pod{Node: "tiny", Index: idx, IP: ip}
	}
	if _, ip, err := l.allocPod(n); err == nil {
		t.Errorf("a full /28 handed out %s (the broadcast address?)", ip)
	}
}

func TestServiceRules(t *testing.T) {
	l := testLab(t)
	rules := l.serviceRules()
	for _, want := range []string{
		"add table ip nm-u-svc\ndelete table ip nm-u-svc\ntable ip nm-u-svc {",
		"type nat hook prerouting priority -100;",
		"type nat hook output priority -100;",
		"meta mark & 0x4000 == 0x4000 masquerade",
		// web: named targetPort http resolved to 8080 on both pods.
		`ip daddr 10.96.0.50 tcp dport 80 jump svc-1-0 comment "shop/web:http"`,
		"numgen random mod 2 vmap { 0 : jump svc-1-0-0, 1 : jump svc-1-0-1 }",
		"ip saddr 10.244.1.2 meta mark set meta mark | 0x4000\n\t\tmeta l4proto tcp dnat to 10.244.1.2:8080",
		"meta l4proto tcp dnat to 10.244.2.2:8080",
		// echo: one endpoint.
		`ip daddr 10.96.0.51 tcp dport 9000 jump svc-0-0`,
		"meta l4proto tcp dnat to 10.244.2.3:9000",
	} {
		if !strings.Contains(rules, want) {
			t.Errorf("rules lack %q:\n%s", want, rules)
		}
	}
	// A service whose pods are all gone gets no DNAT at all.
	for k, p := range l.st.Pods {
		if p.Labels["app"] == "web" {
			delete(l.st.Pods, k)
		}
	}
	if rules := l.serviceRules(); strings.Contains(rules, "10.96.0.50") {
		t.Errorf("rules still send the ClusterIP of a service without endpoints somewhere:\n%s", rules)
	}
}

func TestEndpointsOfNamedPort(t *testing.T) {
	l := testLab(t)
	svc := &l.st.Spec.Services[0]
	eps := l.endpointsOf(svc)
	if len(eps) != 2 {
		t.Fatalf("web endpoints %d, want 2", len(eps))
	}
	for _, e := range eps {
		if len(e.ports) != 1 || *e.ports[0].Port != 8080 || *e.ports[0].Name != "http" {
			t.Errorf("endpoint %s ports %+v", e.pod.Key(), e.ports)
		}
	}
}

func TestIDFor(t *testing.T) {
	cases := map[string]string{
		"/run/nodemesh-lab": "lab", "/run/nodemesh-t1x2y": "t1x2y", "/tmp/elsewhere": DefaultID,
		"/run/nodemesh-TOOLONGID": DefaultID, "/run/nodemesh-demo": "demo",
	}
	for dir, want := range cases {
		if got := IDFor(dir); got != want {
			t.Errorf("IDFor(%s) = %s, want %s", dir, got, want)
		}
	}
}
