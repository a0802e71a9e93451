package telemetry

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/admin"
	l7mesh "github.com/nodemesh/nodemesh/agent/l7/mesh"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

func TestCanonical(t *testing.T) {
	for _, tc := range []struct {
		name          string
		labels        map[string]string
		svc, revision string
	}{
		{"no labels: the workload's name and latest", nil, "web", "latest"},
		{"app and version", map[string]string{"app": "shop-web", "version": "v2"}, "shop-web", "v2"},
		{"app.kubernetes.io beats app", map[string]string{"app": "a", "app.kubernetes.io/name": "k", "version": "v1", "app.kubernetes.io/version": "1.2"}, "k", "1.2"},
		{"Istio's own labels beat everything", map[string]string{"app": "a", "app.kubernetes.io/name": "k", "service.istio.io/canonical-name": "c",
			"version": "v1", "app.kubernetes.io/version": "1.2", "service.istio.io/canonical-revision": "r"}, "c", "r"},
		{"name without revision", map[string]string{"service.istio.io/canonical-name": "c"}, "c", "latest"},
		{"revision without name", map[string]string{"version": "v3"}, "web", "v3"},
		{"a present empty label counts, as in Istio", map[string]string{"app": ""}, "", "latest"},
	} {
		svc, rev := Canonical(tc.labels, "web")
		if svc != tc.svc || rev != tc.revision {
			t.Errorf("%s: %q %q, want %q %q", tc.name, svc, rev, tc.svc, tc.revision)
		}
	}
}

func TestServiceFQDN(t *testing.T) {
	if got := ServiceFQDN("web", "shop", "cluster.local"); got != "web.shop.svc.cluster.local" {
		t.Errorf("got %q", got)
	}
	if got := ServiceFQDN("web", "shop", "corp.example"); got != "web.shop.svc.corp.example" {
		t.Errorf("got %q", got)
	}
}

func TestResponseFlags(t *testing.T) {
	for _, r := range proxy.RefusalReasons {
		got := ResponseFlags(r)
		want := admin.FlagsDeny
		if r == proxy.RefusedNoEndpoints || r.Failure() {
			want = admin.FlagsConnect
		}
		if got != want {
			t.Errorf("%s: %q, want %q", r, got, want)
		}
	}
}

// labelFixture is a cluster with a client and a web pod (behind Service
// shop/web) and the Observer that labels their connections.
func labelFixture(t *testing.T, cfg Config) (*Observer, *prometheus.Registry) {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	st, err := state.NewStore(td)
	if err != nil {
		t.Fatal(err)
	}
	webKey := state.Key{Namespace: "shop", Name: "web-7d9f-x2"}
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop", Labels: map[string]string{state.LabelMode: state.ModeEnabled}})
		tx.SetPod(state.WithDetail(state.Pod{Namespace: "shop", Name: "client-0", ServiceAccount: "client", Node: "n1", Phase: state.PodRunning,
			IPs: []netip.Addr{netip.MustParseAddr("10.0.1.5")}, Workload: "client", Labels: map[string]string{"app": "client"}}, state.PodDetail{UID: "u1"}))
		tx.SetPod(state.WithDetail(state.Pod{Namespace: "shop", Name: webKey.Name, ServiceAccount: "web", Node: "n2", Phase: state.PodRunning,
			IPs: []netip.Addr{netip.MustParseAddr("10.0.2.7")}, Workload: "web",
			Labels: map[string]string{"app.kubernetes.io/name": "storefront", "app.kubernetes.io/version": "1.4.0"}}, state.PodDetail{UID: "u2"}))
		tx.SetService(&state.Service{Namespace: "shop", Name: "web", ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")},
			Ports: []state.ServicePort{{Name: "http", Protocol: "TCP", Port: 80, TargetPort: 8080}}})
		tx.SetEndpointSlice(&state.EndpointSlice{Namespace: "shop", Name: "web-abc", Service: "web", AddressType: "IPv4",
			Ports:     []state.EndpointPort{{Name: "http", Protocol: "TCP", Port: 8080}},
			Endpoints: []state.Endpoint{{Addresses: []netip.Addr{netip.MustParseAddr("10.0.2.7")}, Ready: true, Serving: true, Pod: &webKey}}})
	})
	reg := prometheus.NewRegistry()
	m, err := admin.NewMetrics(reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Metrics, cfg.State = m, st.Snapshot
	return New(cfg), reg
}

// TestConnLabels: both agents label a connection from client to the web
// Service with Istio's values: FQDN, service name and namespace, canonical
// service and revision from the pods' labels, cluster, principals.
func TestConnLabels(t *testing.T) {
	o, _ := labelFixture(t, Config{})
	client := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")
	web := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	ap := netip.MustParseAddrPort
	src := admin.Peer{Workload: "client", Namespace: "shop", Principal: client.String(), CanonicalService: "client", CanonicalRevision: "latest", Cluster: "Kubernetes"}
	dst := admin.Peer{Workload: "web", Namespace: "shop", Principal: web.String(), CanonicalService: "storefront", CanonicalRevision: "1.4.0", Cluster: "Kubernetes"}
	for _, tc := range []struct {
		name string
		flow proxy.Flow
		want admin.Conn
	}{
		{"outbound through the Service", proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportHBONE,
			Workload: &proxy.Workload{Namespace: "shop", Name: "client-0", Identity: client}, SrcIdentity: client, DstIdentity: web,
			Src: ap("10.0.1.5:40000"), OrigDst: ap("10.96.0.10:80"), Dst: ap("10.0.2.7:8080"), Service: "shop/web", DstWorkload: "shop/web-7d9f-x2"},
			admin.Conn{Reporter: "source", Source: src, Destination: dst, DstService: "web.shop.svc.cluster.local", DstServiceName: "web", DstServiceNamespace: "shop",
				SecurityPolicy: "mutual_tls", ResponseFlags: "-"}},
		{"inbound: the Service guessed from the endpoint", proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportHBONE,
			Workload: &proxy.Workload{Namespace: "shop", Name: "web-7d9f-x2", Identity: web}, SrcIdentity: client,
			Src: ap("10.0.1.5:40000"), Dst: ap("10.0.2.7:8080")},
			admin.Conn{Reporter: "destination", Source: src, Destination: dst, DstService: "web.shop.svc.cluster.local", DstServiceName: "web", DstServiceNamespace: "shop",
				SecurityPolicy: "mutual_tls", ResponseFlags: "-"}},
		{"inbound plaintext on a port no Service targets, from outside", proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportPlaintext,
			Workload: &proxy.Workload{Namespace: "shop", Name: "web-7d9f-x2", Identity: web}, Src: ap("192.0.2.9:5555"), Dst: ap("10.0.2.7:9090")},
			admin.Conn{Reporter: "destination", Destination: dst, SecurityPolicy: "none", ResponseFlags: "-"}},
		{"outbound to a pod IP outside the mesh", proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportPlaintext,
			Workload: &proxy.Workload{Namespace: "shop", Name: "client-0", Identity: client}, SrcIdentity: client,
			Src: ap("10.0.1.5:40000"), Dst: ap("192.0.2.1:443")},
			admin.Conn{Reporter: "source", Source: src, SecurityPolicy: "none", ResponseFlags: "-"}},
	} {
		got := o.conn(&tc.flow, tc.want.Start)
		tc.want.Src, tc.want.Dst = tc.flow.Src, tc.flow.Dst
		if *got != tc.want {
			t.Errorf("%s:\n got %+v\nwant %+v", tc.name, *got, tc.want)
		}
	}

	// A configured cluster domain and ID.
	o, _ = labelFixture(t, Config{ClusterDomain: "corp.example", ClusterID: "east"})
	got := o.conn(&proxy.Flow{Direction: proxy.Outbound, Workload: &proxy.Workload{Namespace: "shop", Name: "client-0"}, Service: "shop/web", DstWorkload: "shop/web-7d9f-x2"}, time.Time{})
	if got.DstService != "web.shop.svc.corp.example" || got.Source.Cluster != "east" || got.Destination.Cluster != "east" {
		t.Errorf("configured domain and cluster not used: %+v", got)
	}
}

// TestRefusedLabels: a refused connection counts as opened ("-") and
// closed with DENY, a failed one with CONNECT, as ztunnel reports them.
func TestRefusedLabels(t *testing.T) {
	o, reg := labelFixture(t, Config{})
	f := &proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportPlaintext, Workload: &proxy.Workload{Namespace: "shop", Name: "web-7d9f-x2"},
		Src: netip.MustParseAddrPort("10.0.1.5:1234"), Dst: netip.MustParseAddrPort("10.0.2.7:8080")}
	o.Refused(f, &proxy.Refusal{Reason: proxy.RefusedPolicy})
	o.Refused(f, &proxy.Refusal{Reason: proxy.FailedDial})
	closed := scrape(t, reg, "istio_tcp_connections_closed_total")
	for _, want := range []string{`response_flags="DENY"`, `response_flags="CONNECT"`} {
		if !strings.Contains(closed, want) {
			t.Errorf("closed connections lack %s:\n%s", want, closed)
		}
	}
	if n := testutil.CollectAndCount(reg, "istio_tcp_connections_opened_total"); n != 1 {
		t.Errorf("%d opened series, want one (response_flags -)", n)
	}
}

// scrape returns the text exposition of the named metrics.
func scrape(t *testing.T, reg *prometheus.Registry, names ...string) string {
	t.Helper()
	b, err := testutil.CollectAndFormat(reg, expfmt.TypeTextPlain, names...)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestRequestLabels: a request the L7 layer reports is counted in
// istio_requests_total with its connection's labels (as conn builds
// them) and its own status, and twice when reported twice.
func TestRequestLabels(t *testing.T) {
	o, reg := labelFixture(t, Config{})
	client := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")
	web := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	flow := proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportHBONE,
		Workload: &proxy.Workload{Namespace: "shop", Name: "client-0", Identity: client}, SrcIdentity: client, DstIdentity: web,
		Src: netip.MustParseAddrPort("10.0.1.5:40000"), Dst: netip.MustParseAddrPort("10.0.2.7:8080"), Service: "shop/web", DstWorkload: "shop/web-7d9f-x2"}
	for range 2 {
		o.Request(&l7mesh.RequestInfo{Direction: proxy.Outbound, Flow: &flow, Protocol: "http", Method: "GET", Path: "/a",
			Status: 201, Duration: time.Millisecond, ResponseBytes: 3})
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"reporter": "source", "source_workload": "client", "source_principal": client.String(),
		"destination_workload": "web", "destination_principal": web.String(), "destination_service": "web.shop.svc.cluster.local",
		"destination_canonical_service": "storefront", "response_code": "201", "connection_security_policy": "mutual_tls"}
	found := false
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			found = true
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					t.Errorf("label %s = %q, want %q", k, got[k], v)
				}
			}
			if n := m.GetCounter().GetValue(); n != 2 {
				t.Errorf("counted %v requests, want 2", n)
			}
		}
	}
	if !found {
		t.Fatal("no istio_requests_total series")
	}
}
