package k8s

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/state"
)

func newStore(t testing.TB) *state.Store {
	t.Helper()
	s, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLoadDirTestdata(t *testing.T) {
	m, _, err := LoadDir("testdata")
	if err != nil {
		t.Fatal(err)
	}
	st := newStore(t)
	st.Update(m.Apply)
	snap := st.Snapshot()

	web0 := snap.PodByIP(netip.MustParseAddr("10.244.1.10"))
	if web0 == nil || web0.Name != "web-0" {
		t.Fatalf("pod by IP: %+v", web0)
	}
	if !web0.Enrolled || web0.Identity.String() != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Errorf("web-0 enrolled %t identity %s", web0.Enrolled, web0.Identity)
	}
	if web0.Netns() != "/run/netns/nm-pod-web-0" || web0.Cgroup() != "/sys/fs/cgroup/nm/web-0" {
		t.Errorf("lab annotations: %q %q", web0.Netns(), web0.Cgroup())
	}
	if _, ok := web0.Annotations()["kubectl.kubernetes.io/last-applied-configuration"]; ok {
		t.Error("unneeded annotation kept")
	}
	if !slices.Equal(web0.ExcludeInboundPorts(), []uint16{9100}) || !slices.Equal(web0.ProbePorts, []uint16{8080}) {
		t.Errorf("excluded %v probe ports %v", web0.ExcludeInboundPorts(), web0.ProbePorts)
	}
	if p := snap.Pod("shop", "web-1"); p == nil || p.Enrolled {
		t.Errorf("web-1 (opted out) = %+v", p)
	}
	if p := snap.Pod("legacy", "old"); p == nil || p.Enrolled {
		t.Errorf("legacy/old (from a List, namespace not enrolled) = %+v", p)
	}
	svc, port, ok := snap.ServiceByVIP(netip.MustParseAddrPort("10.96.0.20:80"))
	if !ok || port.TargetPortName != "http" {
		t.Fatalf("service by VIP: %v %+v %t", svc, port, ok)
	}
	var backends []string
	for _, b := range snap.Backends(svc, port) {
		backends = append(backends, b.Addr.String())
	}
	// 10.244.2.10 has no conditions: ready by the API's definition.
	if want := []string{"10.244.1.10:8080", "10.244.2.10:8080"}; !slices.Equal(backends, want) {
		t.Errorf("backends %v, want %v", backends, want)
	}
	if len(snap.NetworkPolicies("shop")) != 1 {
		t.Error("network policy missing")
	}
	aps := snap.Objects(state.GroupKind{Group: "security.nodemesh.io", Kind: "AuthorizationPolicy"})
	if len(aps) != 1 || aps[0].Name != "allow-frontend" {
		t.Errorf("authorization policies %+v", aps)
	}
	if n := snap.Node("node1"); n == nil || len(n.IPs) != 1 || n.IPs[0] != netip.MustParseAddr("192.168.50.11") {
		t.Errorf("node %+v", n)
	}
	if len(m.Skipped) != 1 || !strings.Contains(m.Skipped[0], "Deployment") {
		t.Errorf("skipped %v", m.Skipped)
	}
}

func TestParseManifestsErrors(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"misspelt field", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeNmae: x}\n", "unknown field"},
		{"no kind", "apiVersion: v1\nmetadata: {name: a}\n", "without apiVersion or kind"},
		{"no name", "apiVersion: v1\nkind: Service\nmetadata: {namespace: a}\n", "without metadata.name"},
		{"bad pod IP", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.300}\n", "parsing IP"},
		{"bad cluster IP", "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: nope}\n", "ClusterIP"},
		{"slice without service", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nendpoints: []\n", "kubernetes.io/service-name"},
		{"unsupported CRD version", "apiVersion: security.nodemesh.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: a}\n", "unsupported version"},
		{"not yaml", "a: [b\n", "parsing"},
		{"scalar", "hello\n", "decoding object header"},
		{"nested list", "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items: []\n", "List inside a List"},
		{"wrong type", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {hostNetwork: maybe}\n", "decoding v1 Pod a: json: cannot unmarshal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m Manifests
			err := m.ParseManifests("x.yaml", []byte(tt.doc))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestLoadDirDuplicate(t *testing.T) {
	dir := t.TempDir()
	doc := "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"
	for _, f := range []string{"1.yaml", "2.yaml"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := LoadDir(dir); err == nil || !strings.Contains(err.Error(), "declared twice") {
		t.Fatalf("err %v", err)
	}
	if _, _, err := LoadDir(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing directory loaded")
	}
}

func TestStaticReloadKeepsLastGoodState(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) {
		t.Helper()
		// Write then rename, so the poller never reads a half-written file.
		tmp := filepath.Join(dir, ".tmp")
		if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "ns.yaml")); err != nil {
			t.Fatal(err)
		}
	}
	write("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
	st := newStore(t)
	seen := newLogSeen(nil)
	src := &Static{Dir: dir, Store: st, Interval: 20 * time.Millisecond, Log: slog.New(seen)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	wait, stop := context.WithTimeout(ctx, 60*time.Second)
	defer stop()
	if _, err := st.WaitFor(wait, func(s *state.Snapshot) bool { return s.Synced() && s.Namespace("a") != nil }); err != nil {
		t.Fatal(err)
	}
	write("apiVersion: v1\nkind: Namespace\nmetadata: {name: b, labels: {nodemesh.io/mode: enabled}}\n")
	if _, err := st.WaitFor(wait, func(s *state.Snapshot) bool { return s.Namespace("b") != nil && s.Namespace("a") == nil }); err != nil {
		t.Fatal(err)
	}
	v := st.Version()
	const failed = "reloading static manifests failed, keeping the last good state"
	n := seen.count(failed)
	write("apiVersion: v1\nkind: Namespace\nmetadata: {name: c, labelz: {}}\n") // bad: unknown field
	seen.waitMore(t, failed, n)                                                 // the bad file was read
	snap := st.Snapshot()
	if snap.Version() != v || snap.Namespace("b") == nil || !snap.Namespace("b").Enrolled {
		t.Fatalf("a bad reload changed the state: version %d -> %d", v, snap.Version())
	}
}

func TestStaticFirstLoadMustSucceed(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("kind: Pod\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	st := newStore(t)
	err := (&Static{Dir: dir, Store: st}).Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "bad.yaml") {
		t.Fatalf("err %v", err)
	}
	if st.Snapshot().Synced() {
		t.Fatal("store marked synced after a failed load")
	}
}

func FuzzParseManifests(f *testing.F) {
	for _, name := range []string{"testdata/cluster.yaml", "testdata/policy.yml"} {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: Pod, metadata: {name: a}}]\n"))
	f.Add([]byte("---\n---\n# only a comment\n"))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":70000}]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var m Manifests
		if err := m.ParseManifests("fuzz.yaml", data); err != nil {
			return
		}
		if err := m.check(); err != nil {
			return
		}
		st := newStore(t)
		st.Update(m.Apply)
		snap := st.Snapshot()
		for _, p := range snap.Pods() {
			for _, ip := range p.IPs {
				if !ip.IsValid() {
					t.Fatalf("pod %s has an invalid IP", p.Key())
				}
			}
		}
		for _, svc := range snap.Services() {
			for _, sp := range svc.Ports {
				snap.Backends(svc, sp)
			}
		}
	})
}
