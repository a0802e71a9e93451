package lab

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/examples"
	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/lab/spec"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// TestPrivDataPath builds the example's nodes and pods - namespaces,
// veths, routes, cgroups, processes and the service DNAT rules - without
// an API server (ClusterIPs are made up), and checks the data path. Its
// objects carry the test prefix nmtlab, not the lab's.
func TestPrivDataPath(t *testing.T) {
	privtest.Root(t)
	const pfx = "nmtlab"
	m := func(n string) bool { return n == pfx || strings.HasPrefix(n, pfx+"-") }
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	if err := sweepMatching(ctx, "", m, log); err != nil {
		t.Fatalf("sweeping an earlier run: %v", err)
	}
	t.Cleanup(func() {
		if err := sweepMatching(context.Background(), "", m, log); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	// Warm up the runtime's poller (it keeps an epoll fd and a pipe), then
	// count descriptors: building and removing a lab must not leak any.
	if _, err := netns.Run(ctx, "", nil, "true"); err != nil {
		t.Fatal(err)
	}
	fdsBefore := countFDs(t)
	sp, err := examples.TwoNodesSpec()
	if err != nil {
		t.Fatal(err)
	}
	// A UDP service too (the example has none).
	sp.Pods = append(sp.Pods, spec.Pod{Name: "dns-1", Namespace: "shop", Node: "node-2", ServiceAccount: "default",
		Labels: map[string]string{"app": "dns"}, Command: []string{"nodemeshctl", "lab", "workload", "udp-echo", "--port", "5353"}})
	sp.Services = append(sp.Services, spec.Service{Name: "dns", Namespace: "shop", Selector: map[string]string{"app": "dns"},
		Ports: []spec.ServicePort{{Name: "dns", Port: 53, Protocol: "UDP", TargetPort: intstr.FromInt32(5353)}}})
	if err := sp.Validate("test"); err != nil {
		t.Fatal(err)
	}
	cg2, err := cgroup.Mount()
	if err != nil {
		t.Fatal(err)
	}
	st := &state{
		Version: stateVersion, ID: "x", Dir: t.TempDir(), Cgroup2: cg2, CgroupRoot: filepath.Join(cg2, pfx),
		Spec:  sp,
		Nodes: map[string]*Node{}, Pods: map[string]*Pod{}, Services: map[string]*Service{},
	}
	st.APIServer.ServiceCIDR = sp.Network.ServiceCIDR
	l, err := newLab(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	l.names = names{pfx}
	defer l.wg.Wait()
	defer func() { _ = cgroup.Remove(context.Background(), st.CgroupRoot) }()
	if err := l.buildNodes(ctx, sp); err != nil {
		t.Fatal(err)
	}
	var started []*Pod
	for i := range sp.Pods {
		p, err := l.startPod(ctx, &sp.Pods[i])
		if err != nil {
			t.Fatal(err)
		}
		started = append(started, p)
	}
	var sps []*spec.Pod
	for i := range sp.Pods {
		sps = append(sps, &sp.Pods[i])
	}
	if err := l.waitReady(ctx, sps, started); err != nil {
		t.Fatal(err)
	}
	st.Services["shop/web"] = &Service{Namespace: "shop", Name: "web", ClusterIP: "10.96.7.7", Ports: sp.Services[0].Ports}
	st.Services["shop/echo"] = &Service{Namespace: "shop", Name: "echo", ClusterIP: "10.96.7.8", Ports: sp.Services[1].Ports}
	st.Services["shop/dns"] = &Service{Namespace: "shop", Name: "dns", ClusterIP: "10.96.7.9", Ports: sp.Services[2].Ports}
	if err := l.programServices(ctx); err != nil {
		t.Fatal(err)
	}

	getFrom := func(pod, url string) workload.Reply {
		t.Helper()
		out, err := l.Exec(ctx, pod, []string{"nodemeshctl", "lab", "workload", "get", url})
		if err != nil {
			t.Fatal(err)
		}
		var r workload.Reply
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("%s: %v", out, err)
		}
		return r
	}
	web2, _ := l.Pod("shop/web-2")
	client1, _ := l.Pod("client/client-1")
	if r := getFrom("client/client-1", "http://"+web2.IP+":8080/"); r.Pod != "shop/web-2" || !strings.HasPrefix(r.Remote, client1.IP+":") {
		t.Errorf("across nodes by pod IP: %+v", r)
	}
	seen := map[string]bool{}
	for i := 0; i < 40 && len(seen) < 2; i++ {
		seen[getFrom("client/client-1", "http://10.96.7.7/").Pod] = true
	}
	if len(seen) != 2 {
		t.Errorf("ClusterIP reached %v, want both web pods", seen)
	}
	out, err := l.Exec(ctx, "shop/web-1", []string{"nodemeshctl", "lab", "workload", "tcp", "10.96.7.8:9000", "hello"})
	if err != nil || string(out) != "hello" {
		t.Errorf("tcp echo via ClusterIP: %q %v", out, err)
	}
	var udpOut []byte
	for i := 0; i < 20; i++ { // udp-echo may still be binding
		if udpOut, err = l.Exec(ctx, "client/client-1", []string{"nodemeshctl", "lab", "workload", "udp", "--timeout", "500ms", "10.96.7.9:53", "hello udp"}); err == nil {
			break
		}
	}
	if err != nil || string(udpOut) != "hello udp" {
		t.Errorf("udp echo via ClusterIP: %q %v", udpOut, err)
	}
	// Exec reports a failing command with its output.
	if _, err := l.Exec(ctx, "shop/web-1", []string{"nodemeshctl", "lab", "workload", "get", "--timeout", "2s", "http://10.96.9.9/"}); err == nil {
		t.Error("GET of an unknown ClusterIP succeeded")
	}

	// Removing a pod removes its namespace, cgroup and process.
	p := started[0]
	if err := l.stopPod(ctx, p); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{p.Netns, p.Cgroup} {
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("%s survived stopPod: %v", path, err)
		}
	}
	if !l.exited(p.Pid) {
		t.Errorf("pod process %d survived stopPod", p.Pid)
	}
	left, err := inventory(m)
	if err != nil || len(left) == 0 {
		t.Fatalf("inventory before the sweep: %v %v", left, err)
	}
	if err := sweepMatching(ctx, "", m, log); err != nil {
		t.Fatal(err)
	}
	if left, err := inventory(m); err != nil || len(left) != 0 {
		t.Errorf("after the sweep: %v %v", left, err)
	}
	l.wg.Wait() // every pod process reaped
	if after := countFDs(t); after > fdsBefore {
		t.Errorf("%d file descriptors before the lab, %d after it", fdsBefore, after)
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
