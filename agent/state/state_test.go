package state

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func newStore(t testing.TB) *Store {
	t.Helper()
	s, err := NewStore(td)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func pod(ns, name, ip string, mods ...func(*Pod)) *Pod {
	p := &Pod{Namespace: ns, Name: name, ServiceAccount: "sa-" + name, Node: "node1", Phase: PodRunning,
		IPs: []netip.Addr{addr(ip)}, Labels: map[string]string{"app": name}}
	for _, m := range mods {
		m(p)
	}
	return p
}

func TestNewStoreRejectsEmptyTrustDomain(t *testing.T) {
	if _, err := NewStore(spiffeid.TrustDomain{}); err == nil {
		t.Fatal("NewStore accepted an empty trust domain")
	}
}

func TestEnrollment(t *testing.T) {
	tests := []struct {
		name     string
		nsLabels map[string]string // nil: namespace unknown
		pod      func(*Pod)
		want     bool
	}{
		{"namespace enabled", map[string]string{LabelMode: ModeEnabled}, nil, true},
		{"namespace not labelled", map[string]string{}, nil, false},
		{"namespace other value", map[string]string{LabelMode: "Enabled"}, nil, false},
		{"namespace unknown", nil, nil, false},
		{"pod opts out", map[string]string{LabelMode: ModeEnabled}, func(p *Pod) { p.Labels[LabelMode] = ModeDisabled }, false},
		{"pod label enabled in plain namespace does not enroll", map[string]string{}, func(p *Pod) { p.Labels[LabelMode] = ModeEnabled }, false},
		{"host network never enrolled", map[string]string{LabelMode: ModeEnabled}, func(p *Pod) { p.HostNetwork = true }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			p := pod("ns1", "a", "10.0.0.1")
			if tt.pod != nil {
				tt.pod(p)
			}
			s.Update(func(tx *Tx) {
				if tt.nsLabels != nil {
					tx.SetNamespace(&Namespace{Name: "ns1", Labels: tt.nsLabels})
				}
				tx.SetPod(p)
			})
			got := s.Snapshot().Pod("ns1", "a")
			if got.Enrolled != tt.want {
				t.Fatalf("Enrolled = %t, want %t", got.Enrolled, tt.want)
			}
		})
	}
}

func TestEnrollmentFollowsNamespaceLabel(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) {
		tx.SetNamespace(&Namespace{Name: "ns1"})
		tx.SetPod(pod("ns1", "a", "10.0.0.1"))
	})
	before := s.Snapshot()
	if before.Pod("ns1", "a").Enrolled {
		t.Fatal("enrolled before the namespace label")
	}
	s.Update(func(tx *Tx) {
		tx.SetNamespace(&Namespace{Name: "ns1", Labels: map[string]string{LabelMode: ModeEnabled}})
	})
	after := s.Snapshot()
	if !after.Pod("ns1", "a").Enrolled || !after.Namespace("ns1").Enrolled {
		t.Fatal("not enrolled after the namespace label")
	}
	if before.Pod("ns1", "a").Enrolled {
		t.Fatal("an older snapshot changed")
	}
	if after.Version() <= before.Version() {
		t.Fatalf("version did not increase: %d -> %d", before.Version(), after.Version())
	}
}

func TestIdentity(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) {
		tx.SetPod(pod("ns1", "a", "10.0.0.1"))
		tx.SetPod(pod("ns1", "b", "10.0.0.2", func(p *Pod) { p.ServiceAccount = "" }))
	})
	snap := s.Snapshot()
	for name, want := range map[string]string{
		"a": "spiffe://cluster.local/ns/ns1/sa/sa-a",
		"b": "spiffe://cluster.local/ns/ns1/sa/default",
	} {
		if got := snap.Pod("ns1", name).Identity.String(); got != want {
			t.Errorf("pod %s identity %q, want %q", name, got, want)
		}
		if ref := snap.Pod("ns1", name).Ref; ref != "ns1/"+name {
			t.Errorf("pod %s Ref %q", name, ref)
		}
	}
}

func TestPodByIP(t *testing.T) {
	tests := []struct {
		name string
		pods []*Pod
		ip   string
		want string // "" = none
	}{
		{"single", []*Pod{pod("ns", "a", "10.0.0.1")}, "10.0.0.1", "a"},
		{"unknown ip", []*Pod{pod("ns", "a", "10.0.0.1")}, "10.0.0.2", ""},
		{"v4-mapped lookup", []*Pod{pod("ns", "a", "10.0.0.1")}, "::ffff:10.0.0.1", "a"},
		{"dual stack second ip", []*Pod{pod("ns", "a", "10.0.0.1", func(p *Pod) { p.IPs = append(p.IPs, addr("fd00::1")) })}, "fd00::1", "a"},
		{"host network not indexed", []*Pod{pod("ns", "a", "10.0.0.1", func(p *Pod) { p.HostNetwork = true })}, "10.0.0.1", ""},
		{"live beats finished", []*Pod{
			pod("ns", "a", "10.0.0.1", func(p *Pod) { p.Phase = PodSucceeded }),
			pod("ns", "b", "10.0.0.1"),
		}, "10.0.0.1", "b"},
		{"running beats terminating", []*Pod{
			pod("ns", "a", "10.0.0.1", func(p *Pod) { p.Terminating = true }),
			pod("ns", "b", "10.0.0.1"),
		}, "10.0.0.1", "b"},
		{"running beats pending", []*Pod{
			pod("ns", "a", "10.0.0.1", func(p *Pod) { p.Phase = PodPending }),
			pod("ns", "b", "10.0.0.1"),
		}, "10.0.0.1", "b"},
		{"tie broken by name", []*Pod{pod("ns", "b", "10.0.0.1"), pod("ns", "a", "10.0.0.1")}, "10.0.0.1", "a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			s.Update(func(tx *Tx) {
				for _, p := range tt.pods {
					tx.SetPod(p)
				}
			})
			got := s.Snapshot().PodByIP(addr(tt.ip))
			switch {
			case tt.want == "" && got != nil:
				t.Fatalf("got pod %s, want none", got.Key())
			case tt.want != "" && (got == nil || got.Name != tt.want):
				t.Fatalf("got %v, want pod %s", got, tt.want)
			}
		})
	}
}

func TestPodsOnNodeSorted(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) {
		tx.SetPod(pod("ns2", "a", "10.0.0.1"))
		tx.SetPod(pod("ns1", "b", "10.0.0.2"))
		tx.SetPod(pod("ns1", "a", "10.0.0.3"))
		tx.SetPod(pod("ns1", "c", "10.0.0.4", func(p *Pod) { p.Node = "node2" }))
	})
	var got []string
	for _, p := range s.Snapshot().PodsOnNode("node1") {
		got = append(got, p.Key().String())
	}
	if want := []string{"ns1/a", "ns1/b", "ns2/a"}; !slices.Equal(got, want) {
		t.Fatalf("PodsOnNode = %v, want %v", got, want)
	}
	if n := len(s.Snapshot().PodsOnNode("node3")); n != 0 {
		t.Fatalf("unknown node has %d pods", n)
	}
}

func TestExcludedPortAnnotations(t *testing.T) {
	tests := []struct {
		value    string
		want     []uint16
		problems int
	}{
		{"", nil, 0},
		{"8080", []uint16{8080}, 0},
		{" 9090, 80 ,80", []uint16{80, 9090}, 0},
		{"80,http", nil, 1},
		{"0", nil, 1},
		{"65536", nil, 1},
		{"-1", nil, 1},
		{"80,", nil, 1},
	}
	for _, tt := range tests {
		t.Run(tt.value, func(t *testing.T) {
			s := newStore(t)
			s.Update(func(tx *Tx) {
				tx.SetPod(pod("ns", "a", "10.0.0.1", func(p *Pod) {
					p.SetAnnotations(map[string]string{AnnotationExcludeInboundPorts: tt.value, AnnotationExcludeOutboundPorts: tt.value})
				}))
			})
			p := s.Snapshot().Pod("ns", "a")
			if !slices.Equal(p.ExcludeInboundPorts(), tt.want) || !slices.Equal(p.ExcludeOutboundPorts(), tt.want) {
				t.Fatalf("excluded in %v out %v, want %v", p.ExcludeInboundPorts(), p.ExcludeOutboundPorts(), tt.want)
			}
			if len(p.Problems()) != 2*tt.problems {
				t.Fatalf("problems %q, want %d", p.Problems(), 2*tt.problems)
			}
		})
	}
}

// TestInboundExclusionOfAgentPorts: an inbound exclusion naming an agent
// port (or capture's probe port) is ignored whole and reported; the same
// ports may be excluded outbound (a destination's 15020, say).
func TestInboundExclusionOfAgentPorts(t *testing.T) {
	for _, v := range []string{"15008", "8080,15006", "15099", "15021"} {
		s := newStore(t)
		s.Update(func(tx *Tx) {
			tx.SetPod(pod("ns", "a", "10.0.0.1", func(p *Pod) {
				p.SetAnnotations(map[string]string{AnnotationExcludeInboundPorts: v})
			}))
		})
		p := s.Snapshot().Pod("ns", "a")
		if p.ExcludeInboundPorts() != nil || len(p.Problems()) != 1 || !strings.Contains(p.Problems()[0], "reserved for the nodemesh agent") {
			t.Errorf("exclude-inbound-ports %q: excluded %v, problems %q; want nothing excluded and one problem", v, p.ExcludeInboundPorts(), p.Problems())
		}
	}
}

func TestNetnsAndCgroupAnnotations(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) {
		tx.SetPod(pod("ns", "a", "10.0.0.1", func(p *Pod) {
			p.SetAnnotations(map[string]string{AnnotationNetns: "/run/netns/x", AnnotationCgroup: "/sys/fs/cgroup/x"})
		}))
	})
	p := s.Snapshot().Pod("ns", "a")
	if p.Netns() != "/run/netns/x" || p.Cgroup() != "/sys/fs/cgroup/x" {
		t.Fatalf("netns %q cgroup %q", p.Netns(), p.Cgroup())
	}
}

func TestKeepAnnotation(t *testing.T) {
	for key, want := range map[string]bool{
		AnnotationNetns: true, AnnotationExcludeInboundPorts: true, "nodemesh.io/anything": true,
		"kubectl.kubernetes.io/last-applied-configuration": false, "x.nodemesh.io/y": false,
	} {
		if got := KeepAnnotation(key); got != want {
			t.Errorf("KeepAnnotation(%q) = %t", key, got)
		}
	}
}

func web(ips ...string) *Service {
	svc := &Service{Namespace: "ns", Name: "web", Ports: []ServicePort{
		{Name: "http", Protocol: "TCP", Port: 80, TargetPort: 8080},
		{Name: "dns", Protocol: "UDP", Port: 53, TargetPort: 53},
		{Name: "admin", Protocol: "TCP", Port: 9000, TargetPortName: "admin"},
	}}
	for _, ip := range ips {
		svc.ClusterIPs = append(svc.ClusterIPs, addr(ip))
	}
	return svc
}

func TestServiceByVIP(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) { tx.SetService(web("10.96.0.10", "fd00:96::10")) })
	snap := s.Snapshot()
	tests := []struct {
		ap       string
		wantPort string // "" = not found
	}{
		{"10.96.0.10:80", "http"},
		{"10.96.0.10:9000", "admin"},
		{"[fd00:96::10]:80", "http"},
		{"[::ffff:10.96.0.10]:80", "http"},
		{"10.96.0.10:53", ""}, // UDP is not meshed
		{"10.96.0.10:81", ""},
		{"10.96.0.11:80", ""},
	}
	for _, tt := range tests {
		svc, port, ok := snap.ServiceByVIP(netip.MustParseAddrPort(tt.ap))
		if tt.wantPort == "" {
			if ok {
				t.Errorf("%s: found %s port %s", tt.ap, svc.Key(), port.Name)
			}
			continue
		}
		if !ok || svc.Name != "web" || port.Name != tt.wantPort {
			t.Errorf("%s: got %v %v %t, want port %s", tt.ap, svc, port, ok, tt.wantPort)
		}
	}
}

func TestHeadlessServiceHasNoVIP(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) { tx.SetService(web()) })
	if s.Snapshot().vips.Len() != 0 {
		t.Fatal("headless service indexed by VIP")
	}
}

func ep(ip string, ready, serving, terminating bool) Endpoint {
	return Endpoint{Addresses: []netip.Addr{addr(ip)}, Ready: ready, Serving: serving, Terminating: terminating, Node: "node1"}
}

func TestBackends(t *testing.T) {
	httpPort := []EndpointPort{{Name: "http", Protocol: "TCP", Port: 8080}}
	tests := []struct {
		name   string
		slices []*EndpointSlice
		want   []string
	}{
		{"ready only", []*EndpointSlice{{Name: "s1", Service: "web", AddressType: "IPv4", Ports: httpPort, Endpoints: []Endpoint{
			ep("10.0.0.1", true, true, false), ep("10.0.0.2", false, false, false),
		}}}, []string{"10.0.0.1:8080"}},
		{"serving terminating used when none ready", []*EndpointSlice{{Name: "s1", Service: "web", AddressType: "IPv4", Ports: httpPort, Endpoints: []Endpoint{
			ep("10.0.0.1", false, true, true), ep("10.0.0.2", false, false, true),
		}}}, []string{"10.0.0.1:8080"}},
		{"terminating ignored when some ready", []*EndpointSlice{{Name: "s1", Service: "web", AddressType: "IPv4", Ports: httpPort, Endpoints: []Endpoint{
			ep("10.0.0.1", false, true, true), ep("10.0.0.2", true, true, false),
		}}}, []string{"10.0.0.2:8080"}},
		{"merged across slices and deduplicated", []*EndpointSlice{
			{Name: "s1", Service: "web", AddressType: "IPv4", Ports: httpPort, Endpoints: []Endpoint{ep("10.0.0.3", true, true, false), ep("10.0.0.1", true, true, false)}},
			{Name: "s2", Service: "web", AddressType: "IPv4", Ports: httpPort, Endpoints: []Endpoint{ep("10.0.0.1", true, true, false), ep("10.0.0.2", true, true, false)}},
		}, []string{"10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"}},
		{"port matched by name", []*EndpointSlice{{Name: "s1", Service: "web", AddressType: "IPv4",
			Ports: []EndpointPort{{Name: "other", Protocol: "TCP", Port: 1}}, Endpoints: []Endpoint{ep("10.0.0.1", true, true, false)}}}, nil},
		{"other service ignored", []*EndpointSlice{{Name: "s1", Service: "db", AddressType: "IPv4", Ports: httpPort, Endpoints: []Endpoint{ep("10.0.0.1", true, true, false)}}}, nil},
		{"fqdn ignored", []*EndpointSlice{{Name: "s1", Service: "web", AddressType: "FQDN", Ports: httpPort, Endpoints: []Endpoint{ep("10.0.0.1", true, true, false)}}}, nil},
		{"different namespace ignored", []*EndpointSlice{{Namespace: "other", Name: "s1", Service: "web", AddressType: "IPv4", Ports: httpPort, Endpoints: []Endpoint{ep("10.0.0.1", true, true, false)}}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			s.Update(func(tx *Tx) {
				tx.SetService(web("10.96.0.10"))
				for _, es := range tt.slices {
					if es.Namespace == "" {
						es.Namespace = "ns"
					}
					tx.SetEndpointSlice(es)
				}
			})
			snap := s.Snapshot()
			svc, port, ok := snap.ServiceByVIP(netip.MustParseAddrPort("10.96.0.10:80"))
			if !ok {
				t.Fatal("service not found")
			}
			var got []string
			for _, b := range snap.Backends(svc, port) {
				got = append(got, b.Addr.String())
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("backends %v, want %v", got, tt.want)
			}
		})
	}
}

func TestBackendPods(t *testing.T) {
	s := newStore(t)
	byRef := ep("10.0.0.1", true, true, false)
	byRef.Pod = &Key{"ns", "a"}
	s.Update(func(tx *Tx) {
		tx.SetService(web("10.96.0.10"))
		tx.SetPod(pod("ns", "a", "10.0.0.1"))
		tx.SetPod(pod("ns", "b", "10.0.0.2"))
		tx.SetEndpointSlice(&EndpointSlice{Namespace: "ns", Name: "s", Service: "web", Ports: []EndpointPort{{Name: "http", Port: 8080}},
			Endpoints: []Endpoint{byRef, ep("10.0.0.2", true, true, false), ep("192.0.2.1", true, true, false)}})
	})
	snap := s.Snapshot()
	svc := snap.Service("ns", "web")
	bs := snap.Backends(svc, svc.Ports[0])
	if len(bs) != 3 {
		t.Fatalf("got %d backends", len(bs))
	}
	if snap.BackendPod(bs[0]) == nil || snap.BackendPod(bs[0]).Name != "a" || snap.BackendPod(bs[1]) == nil || snap.BackendPod(bs[1]).Name != "b" || snap.BackendPod(bs[2]) != nil {
		t.Fatalf("backend pods wrong: %+v", bs)
	}
	if k, ok := bs[0].PodRef(); !ok || k != (Key{"ns", "a"}) {
		t.Errorf("PodRef of the referencing backend = %v, %t", k, ok)
	}
	if _, ok := bs[1].PodRef(); ok {
		t.Errorf("PodRef of a backend without a targetRef reports one")
	}
}

func TestDeleteAndReset(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) {
		tx.SetPod(pod("ns", "a", "10.0.0.1"))
		tx.SetService(web("10.96.0.10"))
		tx.SetObject(&Object{GroupKind: GroupKind{"security.nodemesh.io", "AuthorizationPolicy"}, Namespace: "ns", Name: "p"})
		tx.SetNetworkPolicy(&NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "np"}})
	})
	v := s.Version()
	s.Update(func(tx *Tx) { tx.DeletePod(Key{"ns", "missing"}) })
	if s.Version() != v {
		t.Fatal("deleting a missing pod bumped the version")
	}
	snap := s.Snapshot()
	if len(snap.Objects(GroupKind{"security.nodemesh.io", "AuthorizationPolicy"})) != 1 || len(snap.NetworkPolicies("ns")) != 1 || len(snap.NetworkPolicies("")) != 1 || len(snap.NetworkPolicies("x")) != 0 {
		t.Fatal("objects or network policies missing")
	}
	s.Update(func(tx *Tx) {
		tx.DeletePod(Key{"ns", "a"})
		tx.DeleteObject(GroupKind{"security.nodemesh.io", "AuthorizationPolicy"}, Key{"ns", "p"})
	})
	after := s.Snapshot()
	if after.PodByIP(addr("10.0.0.1")) != nil || len(after.Objects(GroupKind{"security.nodemesh.io", "AuthorizationPolicy"})) != 0 {
		t.Fatal("delete did not apply")
	}
	if snap.PodByIP(addr("10.0.0.1")) == nil || len(snap.Objects(GroupKind{"security.nodemesh.io", "AuthorizationPolicy"})) != 1 {
		t.Fatal("delete changed an older snapshot")
	}
	s.Update(func(tx *Tx) { tx.Reset() })
	if n := len(s.Snapshot().Services()); n != 0 {
		t.Fatalf("%d services after reset", n)
	}
	if len(snap.Services()) != 1 {
		t.Fatal("reset changed an older snapshot")
	}
}

func TestSubscribeAndWaitFor(t *testing.T) {
	s := newStore(t)
	ch, cancel := s.Subscribe()
	defer cancel()
	for i := range 5 {
		s.Update(func(tx *Tx) { tx.SetPod(pod("ns", fmt.Sprint("p", i), "10.0.0.1")) })
	}
	select {
	case <-ch:
	default:
		t.Fatal("no notification")
	}
	select {
	case <-ch:
		t.Fatal("notifications did not coalesce")
	default:
	}

	ctx, stop := context.WithTimeout(context.Background(), 30*time.Second)
	defer stop()
	done := make(chan error, 1)
	go func() {
		_, err := s.WaitFor(ctx, func(snap *Snapshot) bool { return snap.Synced() })
		done <- err
	}()
	s.MarkSynced()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	short, stop2 := context.WithCancel(context.Background())
	stop2()
	if _, err := s.WaitFor(short, func(*Snapshot) bool { return false }); err == nil {
		t.Fatal("WaitFor returned nil on a cancelled context")
	}
}

func TestSnapshotCached(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) { tx.SetPod(pod("ns", "a", "10.0.0.1")) })
	first := s.Snapshot()
	if second := s.Snapshot(); first != second {
		t.Fatal("unchanged store rebuilt its snapshot")
	}
}

func BenchmarkPodByIP(b *testing.B) {
	s := newStore(b)
	s.Update(func(tx *Tx) {
		for i := range 5000 {
			tx.SetPod(pod("ns", fmt.Sprint("p", i), netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}).String()))
		}
	})
	ip := addr("10.1.10.10")
	b.ReportAllocs()
	for b.Loop() {
		if s.Snapshot().PodByIP(ip) == nil {
			b.Fatal("missing")
		}
	}
}

func BenchmarkRebuild5000Pods(b *testing.B) {
	s := newStore(b)
	s.Update(func(tx *Tx) {
		tx.SetNamespace(&Namespace{Name: "ns", Labels: map[string]string{LabelMode: ModeEnabled}})
		for i := range 5000 {
			tx.SetPod(pod("ns", fmt.Sprint("p", i), netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}).String()))
		}
	})
	b.ReportAllocs()
	for b.Loop() {
		s.Update(func(tx *Tx) { tx.SetPod(pod("ns", "p1", "10.1.0.1")) })
		s.Snapshot()
	}
}

func TestNodes(t *testing.T) {
	s := newStore(t)
	s.Update(func(tx *Tx) {
		tx.SetNode(&Node{Name: "n2", IPs: []netip.Addr{addr("192.168.0.2")}})
		tx.SetNode(&Node{Name: "n1", IPs: []netip.Addr{addr("192.168.0.1")}})
	})
	snap := s.Snapshot()
	if ns := snap.Nodes(); len(ns) != 2 || ns[0].Name != "n1" || snap.Node("n2") == nil {
		t.Fatalf("nodes %+v", ns)
	}
	v := s.Version()
	s.Update(func(tx *Tx) { tx.DeleteNode("n3") })
	if s.Version() != v {
		t.Fatal("deleting a missing node bumped the version")
	}
	s.Update(func(tx *Tx) { tx.DeleteNode("n2") })
	if s.Snapshot().Node("n2") != nil || snap.Node("n2") == nil {
		t.Fatal("node delete wrong")
	}
}

// scaleStore is a cluster of n pods in 1,000 namespaces on n/20 nodes, one
// Service and EndpointSlice per 10 pods.
func scaleStore(b testing.TB, n int) *Store {
	s := newStore(b)
	s.Update(func(tx *Tx) {
		for ns := range 1000 {
			tx.SetNamespace(&Namespace{Name: fmt.Sprint("ns", ns), Labels: map[string]string{LabelMode: ModeEnabled}})
		}
		for i := range n {
			tx.SetPod(scalePod(i, "a"))
		}
		for svc := range n / 10 {
			ns := fmt.Sprint("ns", svc%1000)
			ip := netip.AddrFrom4([4]byte{10, 96, byte(svc >> 8), byte(svc)})
			tx.SetService(&Service{Namespace: ns, Name: fmt.Sprint("svc", svc), ClusterIPs: []netip.Addr{ip},
				Ports: []ServicePort{{Name: "http", Protocol: "TCP", Port: 80, TargetPort: 8080}}})
			es := &EndpointSlice{Namespace: ns, Name: fmt.Sprint("svc", svc, "-x"), Service: fmt.Sprint("svc", svc), AddressType: "IPv4",
				Ports: []EndpointPort{{Name: "http", Protocol: "TCP", Port: 8080}}}
			for j := range 10 {
				i := svc*10 + j
				es.Endpoints = append(es.Endpoints, Endpoint{Addresses: []netip.Addr{scaleIP(i)}, Ready: true, Serving: true,
					Node: fmt.Sprint("node", i%(n/20+1)), Pod: &Key{fmt.Sprint("ns", i%1000), fmt.Sprint("p", i)}})
			}
			tx.SetEndpointSlice(es)
		}
	})
	s.Snapshot()
	return s
}

func scaleIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
}

func scalePod(i int, app string) *Pod {
	n := 100000
	return &Pod{Namespace: fmt.Sprint("ns", i%1000), Name: fmt.Sprint("p", i), ServiceAccount: "default",
		Node: fmt.Sprint("node", i%(n/20+1)), Phase: PodRunning, IPs: []netip.Addr{scaleIP(i)}, Labels: map[string]string{"app": app}}
}

// BenchmarkSnapshotAfterPodChange is the agent's cost per pod change at
// scale: one pod relabelled, then the next snapshot built.
func BenchmarkSnapshotAfterPodChange(b *testing.B) {
	for _, n := range []int{10000, 100000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			s := scaleStore(b, n)
			b.ReportAllocs()
			i := 0
			start := cpuTime(b)
			for b.Loop() {
				i++
				s.Update(func(tx *Tx) { tx.SetPod(scalePod(i%n, fmt.Sprint("app", i))) })
				s.Snapshot()
			}
			// CPU time (the process's, GC included) is steadier than wall
			// time on a shared machine.
			b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
		})
	}
}

func cpuTime(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
