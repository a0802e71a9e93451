package lab_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/examples"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/lab/spec"
	"github.com/nodemesh/nodemesh/lab/workload"
)

func get(t *testing.T, l *lab.Lab, from, url string) workload.Reply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, out, err := demo.Get(ctx, l, from, url)
	if err != nil {
		t.Fatalf("GET %s from %s: %v (%s)", url, from, err, out)
	}
	return r
}

func mustPod(t *testing.T, l *lab.Lab, name string) lab.Pod {
	t.Helper()
	p, err := l.Pod(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func host(addr string) string {
	h, _, _ := net.SplitHostPort(addr)
	return h
}

// TestLabTwoNodes brings the example up and checks the data path, the API
// objects, the kernel objects, Apply and node processes against it.
func TestLabTwoNodes(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx := context.Background()
	t.Logf("start-up time of the two-node example: %s", l.StartupTime().Round(time.Millisecond))

	t.Run("PodToPodSameNode", func(t *testing.T) {
		src, dst := mustPod(t, l, "client/client-1"), mustPod(t, l, "shop/web-1")
		if src.Node != dst.Node {
			t.Fatalf("example changed: %s on %s, %s on %s", src.Key(), src.Node, dst.Key(), dst.Node)
		}
		r := get(t, l, src.Key(), "http://"+dst.IP+":8080/x")
		if r.Pod != dst.Key() || host(r.Remote) != src.IP || r.Path != "/x" {
			t.Errorf("reply %+v; want pod %s seeing %s", r, dst.Key(), src.IP)
		}
	})
	t.Run("PodToPodAcrossNodes", func(t *testing.T) {
		src, dst := mustPod(t, l, "client/client-1"), mustPod(t, l, "shop/web-2")
		if src.Node == dst.Node {
			t.Fatal("example changed: both pods on one node")
		}
		r := get(t, l, src.Key(), "http://"+dst.IP+":8080/")
		if r.Pod != dst.Key() || r.Node != dst.Node || host(r.Remote) != src.IP || host(r.Local) != dst.IP {
			t.Errorf("reply %+v; want %s on %s seeing %s", r, dst.Key(), dst.Node, src.IP)
		}
		// And back, from node-2 to node-1.
		r = get(t, l, "client/client-2", "http://"+mustPod(t, l, "shop/web-1").IP+":8080/")
		if r.Pod != "shop/web-1" {
			t.Errorf("reply from %s, want shop/web-1", r.Pod)
		}
	})
	t.Run("ClusterIP", func(t *testing.T) {
		svc, err := l.Service("shop/web")
		if err != nil {
			t.Fatal(err)
		}
		url := fmt.Sprintf("http://%s:80/", svc.ClusterIP)
		seen := map[string]bool{}
		for i := 0; i < 40 && len(seen) < 2; i++ {
			r := get(t, l, "client/client-2", url)
			seen[r.Pod] = true
			if host(r.Remote) != mustPod(t, l, "client/client-2").IP {
				t.Errorf("the server saw %s, want the client's own IP (no SNAT)", r.Remote)
			}
			if host(r.Local) == svc.ClusterIP {
				t.Errorf("the server saw the ClusterIP as local address: no DNAT happened")
			}
		}
		if !seen["shop/web-1"] || !seen["shop/web-2"] {
			t.Errorf("40 requests to %s reached %v; want both web pods", url, seen)
		}
		echo, err := l.Service("shop/echo")
		if err != nil {
			t.Fatal(err)
		}
		out, err := l.Exec(ctx, "client/client-1", []string{"nodemeshctl", "lab", "workload", "tcp", echo.ClusterIP + ":9000", "ping over tcp"})
		if err != nil || string(out) != "ping over tcp" {
			t.Errorf("tcp echo through %s: %q, %v", echo.ClusterIP, out, err)
		}
	})
	t.Run("ClusterIPHairpin", func(t *testing.T) {
		svc, _ := l.Service("shop/web")
		self := false
		for i := 0; i < 40 && !self; i++ {
			r := get(t, l, "shop/web-1", fmt.Sprintf("http://%s:80/", svc.ClusterIP))
			self = r.Pod == "shop/web-1"
		}
		if !self {
			t.Error("shop/web-1 never reached itself through its service")
		}
	})
	t.Run("ClusterIPFromNode", func(t *testing.T) {
		svc, _ := l.Service("shop/web")
		out, err := l.ExecNode(ctx, "node-1", []string{"nodemeshctl", "lab", "workload", "get", fmt.Sprintf("http://%s:80/", svc.ClusterIP)})
		if err != nil || !strings.Contains(string(out), `"pod":"shop/web-`) {
			t.Errorf("node-1 -> ClusterIP: %s, %v", out, err)
		}
	})
	t.Run("PodToNode", func(t *testing.T) {
		n2, _ := l.Node("node-2")
		p, err := l.StartNodeProcess(ctx, "node-2", "probe", []string{"nodemeshctl", "lab", "workload", "http", "--port", "15021"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		var r workload.Reply
		var last error
		for i := 0; i < 100; i++ {
			var out []byte
			r, out, last = demo.Get(ctx, l, "client/client-1", "http://"+n2.IP+":15021/")
			if last == nil {
				break
			}
			_ = out
			time.Sleep(100 * time.Millisecond)
		}
		if last != nil {
			t.Fatalf("pod on node-1 -> node-2 process: %v", last)
		}
		if r.Node != "node-2" || host(r.Remote) != mustPod(t, l, "client/client-1").IP {
			t.Errorf("reply %+v", r)
		}
		cg, err := cgroup.Of(p.Pid)
		if err != nil || !strings.HasPrefix(filepath.Join(mustCg2(t), cg), n2.ProcessCgroup) {
			t.Errorf("node process cgroup %s (%v), want under %s", cg, err, n2.ProcessCgroup)
		}
		if _, err := l.StartNodeProcess(ctx, "node-2", "probe", []string{"sleep", "1"}, nil); err == nil {
			t.Error("a second process with a running name was started")
		}
		if err := l.StopNodeProcess(ctx, "node-2", "probe", 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if l.Running(p) {
			t.Error("node process still running after StopNodeProcess")
		}
	})
	t.Run("KernelObjects", func(t *testing.T) {
		cg2 := mustCg2(t)
		for _, p := range l.Pods() {
			nsIno, err := netns.Inode(p.Netns)
			if err != nil {
				t.Fatal(err)
			}
			procIno, err := netns.Inode(fmt.Sprintf("/proc/%d/ns/net", p.Pid))
			if err != nil || procIno != nsIno {
				t.Errorf("pod %s: process %d is not in %s", p.Key(), p.Pid, p.Netns)
			}
			cg, err := cgroup.Of(p.Pid)
			if err != nil || filepath.Join(cg2, cg) != p.Cgroup {
				t.Errorf("pod %s: process cgroup %s, want %s (%v)", p.Key(), cg, p.Cgroup, err)
			}
			n, _ := l.Node(p.Node)
			if filepath.Dir(p.Cgroup) != n.Cgroup {
				t.Errorf("pod %s cgroup %s is not directly under its node's %s", p.Key(), p.Cgroup, n.Cgroup)
			}
			links, err := netns.Links(p.Netns)
			if err != nil || strings.Join(links, ",") != "lo,eth0" {
				t.Errorf("pod %s links %v (%v)", p.Key(), links, err)
			}
		}
		// The host has no address on, and no route into, the underlay.
		out, err := exec.Command("ip", "-4", "addr", "show", "dev", "nm-"+l.ID()+"-br").CombinedOutput()
		if err != nil || strings.Contains(string(out), "inet ") {
			t.Errorf("the bridge has an address in the root namespace: %s %v", out, err)
		}
		out, _ = exec.Command("ip", "-4", "route", "show").CombinedOutput()
		if strings.Contains(string(out), "10.244.") || strings.Contains(string(out), "10.250.") {
			t.Errorf("the host routes into the lab:\n%s", out)
		}
	})
	t.Run("APIObjects", func(t *testing.T) { checkAPIObjects(t, l) })
	t.Run("APIFromNode", func(t *testing.T) {
		n, _ := l.Node("node-1")
		cfg := rest.CopyConfig(l.Server.REST)
		cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := netns.Do(n.Netns, func() error {
				var d net.Dialer
				var err error
				c, err = d.DialContext(ctx, network, addr)
				return err
			})
			return c, err
		}
		cs, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil || len(nodes.Items) != 2 {
			t.Fatalf("listing nodes from inside node-1's namespace: %v", err)
		}
	})
	t.Run("Load", func(t *testing.T) {
		l2, err := lab.Load(l.StateDir())
		if err != nil {
			t.Fatal(err)
		}
		if !slices.EqualFunc(l2.Pods(), l.Pods(), func(a, b lab.Pod) bool { return a.Key() == b.Key() && a.IP == b.IP && a.Pid == b.Pid }) {
			t.Errorf("a loaded lab has other pods")
		}
		out, err := l2.Exec(ctx, "shop/web-1", []string{"cat", "/proc/self/cgroup"})
		if err != nil || !strings.Contains(string(out), "/node-node-1/shop_web-1") {
			t.Errorf("exec through a loaded lab: %s %v", out, err)
		}
	})
	t.Run("Apply", func(t *testing.T) { checkApply(t, l) })
}

func mustCg2(t *testing.T) string {
	cg2, err := cgroup.Mount()
	if err != nil {
		t.Fatal(err)
	}
	return cg2
}

func isTrue(b *bool) bool { return b != nil && *b }

func checkAPIObjects(t *testing.T, l *lab.Lab) {
	ctx := context.Background()
	cs := l.Server.Client
	for _, n := range l.Nodes() {
		obj, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var ip string
		for _, a := range obj.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				ip = a.Address
			}
		}
		if ip != n.IP || obj.Spec.PodCIDR != n.PodCIDR {
			t.Errorf("node %s: InternalIP %s podCIDR %s; lab says %s, %s", n.Name, ip, obj.Spec.PodCIDR, n.IP, n.PodCIDR)
		}
	}
	sp := l.Spec()
	for _, ns := range sp.Namespaces {
		obj, err := cs.CoreV1().Namespaces().Get(ctx, ns.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range ns.Labels {
			if obj.Labels[k] != v {
				t.Errorf("namespace %s label %s=%q, want %q", ns.Name, k, obj.Labels[k], v)
			}
		}
		if obj.Labels[corev1.LabelMetadataName] != ns.Name {
			t.Errorf("namespace %s lacks %s", ns.Name, corev1.LabelMetadataName)
		}
	}
	for _, p := range l.Pods() {
		obj, err := cs.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ready := false
		for _, c := range obj.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				ready = true
			}
		}
		n, _ := l.Node(p.Node)
		switch {
		case obj.Spec.NodeName != p.Node, obj.Status.PodIP != p.IP, obj.Status.HostIP != n.IP,
			obj.Status.Phase != corev1.PodRunning, !ready, string(obj.UID) != p.UID,
			obj.Spec.ServiceAccountName != p.ServiceAccount:
			t.Errorf("pod %s in the API: node %s ip %s host %s phase %s ready %v sa %s; lab says %+v",
				p.Key(), obj.Spec.NodeName, obj.Status.PodIP, obj.Status.HostIP, obj.Status.Phase, ready, obj.Spec.ServiceAccountName, p)
		}
		if obj.Annotations[lab.AnnotationNetns] != p.Netns || obj.Annotations[lab.AnnotationCgroup] != p.Cgroup {
			t.Errorf("pod %s annotations %v; want netns %s cgroup %s", p.Key(), obj.Annotations, p.Netns, p.Cgroup)
		}
		if _, err := cs.CoreV1().ServiceAccounts(p.Namespace).Get(ctx, p.ServiceAccount, metav1.GetOptions{}); err != nil {
			t.Errorf("service account of %s: %v", p.Key(), err)
		}
	}
	for _, s := range l.Services() {
		obj, err := cs.CoreV1().Services(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if obj.Spec.ClusterIP != s.ClusterIP || obj.Spec.Type != corev1.ServiceTypeClusterIP {
			t.Errorf("service %s: %s %s; lab says %s", s.Key(), obj.Spec.Type, obj.Spec.ClusterIP, s.ClusterIP)
		}
	}
	// EndpointSlices of shop/web: both web pods, the named port resolved.
	got := sliceEndpoints(t, l, "shop", "web")
	want := []string{
		fmt.Sprintf("%s node-1 shop/web-1 http=8080", mustPod(t, l, "shop/web-1").IP),
		fmt.Sprintf("%s node-2 shop/web-2 http=8080", mustPod(t, l, "shop/web-2").IP),
	}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Errorf("endpoints of shop/web:\n got %v\nwant %v", got, want)
	}
}

// sliceEndpoints lists "ip node ns/pod portname=port" for every ready
// endpoint of the service, read from the API server.
func sliceEndpoints(t *testing.T, l *lab.Lab, ns, svc string) []string {
	t.Helper()
	sl, err := l.Server.Client.DiscoveryV1().EndpointSlices(ns).List(context.Background(), metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range sl.Items {
		var ports []string
		for _, p := range s.Ports {
			ports = append(ports, fmt.Sprintf("%s=%d", *p.Name, *p.Port))
		}
		for _, e := range s.Endpoints {
			if !isTrue(e.Conditions.Ready) || e.TargetRef == nil || e.NodeName == nil {
				t.Errorf("endpoint %v is not ready or lacks targetRef/nodeName", e.Addresses)
				continue
			}
			out = append(out, fmt.Sprintf("%s %s %s/%s %s", e.Addresses[0], *e.NodeName, e.TargetRef.Namespace, e.TargetRef.Name, strings.Join(ports, ",")))
		}
	}
	sort.Strings(out)
	return out
}

func checkApply(t *testing.T, l *lab.Lab) {
	ctx := context.Background()
	sp := l.Spec()
	// Scale web up: web-3 on node-1.
	web3 := *mustSpecPod(t, sp, "shop/web-1")
	web3.Name = "web-3"
	sp.Pods = append(sp.Pods, web3)
	if err := l.Apply(ctx, sp); err != nil {
		t.Fatal(err)
	}
	p3 := mustPod(t, l, "shop/web-3")
	got := sliceEndpoints(t, l, "shop", "web")
	if len(got) != 3 || !strings.Contains(strings.Join(got, ";"), p3.IP+" node-1 shop/web-3") {
		t.Fatalf("after scaling up, endpoints %v", got)
	}
	svc, _ := l.Service("shop/web")
	seen := false
	for i := 0; i < 60 && !seen; i++ {
		seen = get(t, l, "client/client-2", fmt.Sprintf("http://%s:80/", svc.ClusterIP)).Pod == "shop/web-3"
	}
	if !seen {
		t.Error("the ClusterIP never reached the new pod shop/web-3")
	}

	// Scale down: web-2 goes away; its process, namespace and object with it.
	old := mustPod(t, l, "shop/web-2")
	sp = l.Spec()
	sp.Pods = slices.DeleteFunc(sp.Pods, func(p spec.Pod) bool { return p.Key() == "shop/web-2" })
	if err := l.Apply(ctx, sp); err != nil {
		t.Fatal(err)
	}
	got = sliceEndpoints(t, l, "shop", "web")
	if len(got) != 2 || strings.Contains(strings.Join(got, ";"), "web-2") {
		t.Errorf("after scaling down, endpoints %v", got)
	}
	if _, err := os.Stat(old.Netns); !os.IsNotExist(err) {
		t.Errorf("the netns of the removed pod is still there: %v", err)
	}
	if _, err := os.Stat(old.Cgroup); !os.IsNotExist(err) {
		t.Errorf("the cgroup of the removed pod is still there: %v", err)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", old.Pid)); err == nil {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", old.Pid)); !strings.Contains(string(b), ") Z") {
			t.Errorf("the process of the removed pod (%d) is still running", old.Pid)
		}
	}
	if _, err := l.Server.Client.CoreV1().Pods("shop").Get(ctx, "web-2", metav1.GetOptions{}); err == nil {
		t.Error("the removed pod's object is still in the API server")
	}
	for i := 0; i < 20; i++ {
		if r := get(t, l, "client/client-2", fmt.Sprintf("http://%s:80/", svc.ClusterIP)); r.Pod == "shop/web-2" {
			t.Fatal("the ClusterIP still reaches the removed pod")
		}
	}

	// Relabel: echo-1 leaves service echo's selector -> its slice empties.
	sp = l.Spec()
	for i := range sp.Pods {
		if sp.Pods[i].Key() == "shop/echo-1" {
			sp.Pods[i].Labels = map[string]string{"app": "echo", "track": "canary"}
		}
	}
	pidBefore := mustPod(t, l, "shop/echo-1").Pid
	if err := l.Apply(ctx, sp); err != nil {
		t.Fatal(err)
	}
	if mustPod(t, l, "shop/echo-1").Pid != pidBefore {
		t.Error("a label change restarted the pod")
	}
	obj, err := l.Server.Client.CoreV1().Pods("shop").Get(ctx, "echo-1", metav1.GetOptions{})
	if err != nil || obj.Labels["track"] != "canary" {
		t.Errorf("relabel not in the API: %v %v", obj.Labels, err)
	}

	// A namespace comes, goes (really: no Terminating leftover) and comes back.
	base := l.Spec()
	withNS := l.Spec()
	withNS.Namespaces = append(withNS.Namespaces, spec.Namespace{Name: "extra", Labels: map[string]string{"x": "1"}})
	withNS.Pods = append(withNS.Pods, spec.Pod{Name: "e1", Namespace: "extra", Node: "node-2", ServiceAccount: "default",
		Command: []string{"nodemeshctl", "lab", "workload", "sleep"}})
	for round := 0; round < 2; round++ {
		if err := l.Apply(ctx, withNS); err != nil {
			t.Fatalf("round %d, adding namespace extra: %v", round, err)
		}
		if _, err := l.Pod("extra/e1"); err != nil {
			t.Fatal(err)
		}
		if err := l.Apply(ctx, base); err != nil {
			t.Fatalf("round %d, removing namespace extra: %v", round, err)
		}
		if _, err := l.Server.Client.CoreV1().Namespaces().Get(ctx, "extra", metav1.GetOptions{}); err == nil {
			t.Errorf("round %d: namespace extra still exists after its removal", round)
		}
	}

	// A pod that cannot start fails Apply and leaves the lab as it was; the
	// corrected spec then applies.
	before := l.Pods()
	bad := l.Spec()
	bad.Pods = append(bad.Pods, spec.Pod{Name: "bad", Namespace: "shop", Node: "node-1", ServiceAccount: "default",
		Command: []string{"sh", "-c", "exit 1"}, Ports: []spec.ContainerPort{{ContainerPort: 7000, Protocol: "TCP"}}})
	if err := l.Apply(ctx, bad); err == nil || !strings.Contains(err.Error(), "shop/bad") {
		t.Errorf("Apply of a crashing pod: %v", err)
	}
	if after := l.Pods(); len(after) != len(before) {
		t.Errorf("a failed Apply changed the pods: %d before, %d after", len(before), len(after))
	}
	if _, err := os.Stat("/run/netns/nm-" + l.ID() + "-pod-shop_bad"); !os.IsNotExist(err) {
		t.Errorf("the failed pod's namespace is left: %v", err)
	}
	good := l.Spec()
	good.Pods = append(good.Pods, spec.Pod{Name: "bad", Namespace: "shop", Node: "node-1", ServiceAccount: "default",
		Command: []string{"nodemeshctl", "lab", "workload", "sleep"}})
	if err := l.Apply(ctx, good); err != nil {
		t.Errorf("Apply after a failed one: %v", err)
	}

	// A spec that changes nodes is refused.
	sp = l.Spec()
	sp.Nodes = append(sp.Nodes, spec.Node{Name: "node-3"})
	if err := l.Apply(ctx, sp); err == nil {
		t.Error("Apply accepted a change of nodes")
	}
}

func mustSpecPod(t *testing.T, sp *spec.Spec, key string) *spec.Pod {
	p, ok := sp.Pod(key)
	if !ok {
		t.Fatalf("spec has no pod %s", key)
	}
	return p
}

// snapshot lists, with tools independent of the lab's code, what on the
// machine carries a lab's name: network namespaces, links, cgroups,
// nftables tables and processes.
func snapshot(t *testing.T, id, stateDir string) []string {
	t.Helper()
	name := "nm-" + id
	var out []string
	run := func(args ...string) string {
		b, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, b)
		}
		return string(b)
	}
	for _, line := range strings.Split(run("ip", "netns", "list"), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], name) {
			out = append(out, "netns "+f[0])
		}
	}
	for _, line := range strings.Split(run("ip", "-o", "link", "show"), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(strings.TrimSuffix(f[1], ":"), name) {
			out = append(out, "link "+f[1])
		}
	}
	cg2 := mustCg2(t)
	if m, _ := filepath.Glob(filepath.Join(cg2, name+"*")); len(m) > 0 {
		for _, d := range m {
			out = append(out, "cgroup "+d)
		}
	}
	for _, line := range strings.Split(run("nft", "list", "tables"), "\n") {
		if strings.Contains(line, name) {
			out = append(out, "nft "+line)
		}
	}
	// Processes: in one of the lab's cgroups, or naming its state
	// directory. Zombies are dead: killed processes whose parent (init,
	// once their creator was SIGKILLed) has not yet collected them.
	procs, _ := os.ReadDir("/proc")
	for _, e := range procs {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err1 := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		cg, err2 := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		cmdline, err3 := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err1 != nil || err2 != nil || err3 != nil {
			continue // gone meanwhile
		}
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			continue
		}
		args := strings.ReplaceAll(string(cmdline), "\x00", " ")
		if strings.Contains(args, stateDir+"/") || strings.Contains(string(cg), "/"+name+"/") || strings.HasSuffix(strings.TrimSpace(string(cg)), "/"+name) {
			out = append(out, fmt.Sprintf("process %d %s", pid, args))
		}
	}
	for _, f := range []string{stateDir, stateDir + ".lock", "/sys/fs/bpf/" + name} {
		if _, err := os.Stat(f); err == nil {
			out = append(out, "file "+f)
		}
	}
	sort.Strings(out)
	return out
}

// TestLabDownAfterSIGKILL starts a lab creator as a child process, kills
// it with SIGKILL (once in the middle of Up, once after), and proves that
// Down leaves nothing behind.
func TestLabDownAfterSIGKILL(t *testing.T) {
	privtest.Root(t)
	labtest.SweepStale(t)
	for _, when := range []string{"during-up", "after-up"} {
		t.Run(when, func(t *testing.T) {
			id := labtest.NewID()
			dir := labtest.Dir(id)
			before := snapshot(t, id, dir)
			if len(before) != 0 {
				t.Fatalf("fresh ID %s already has objects: %v", id, before)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestLabHelperCreator$", "-test.v")
			cmd.Env = append(os.Environ(), "NODEMESH_LABTEST_CREATOR="+id)
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waited := make(chan struct{})
			lines := make(chan string, 100)
			go func() {
				sc := bufio.NewScanner(stdout)
				for sc.Scan() {
					lines <- sc.Text()
				}
				close(lines)
			}()
			deadline := time.After(3 * time.Minute)
			switch when {
			case "during-up":
				// Kill as soon as the first pod namespace exists.
				for {
					if m, _ := filepath.Glob("/run/netns/nm-" + id + "-pod-*"); len(m) > 0 {
						break
					}
					select {
					case <-deadline:
						t.Fatal("no pod namespace appeared")
					case <-time.After(5 * time.Millisecond):
					}
				}
			case "after-up":
				for up := false; !up; {
					select {
					case l, ok := <-lines:
						if !ok {
							t.Fatal("the creator exited before the lab was up")
						}
						up = strings.Contains(l, "LAB-IS-UP")
					case <-deadline:
						t.Fatal("the creator did not bring the lab up")
					}
				}
			}
			if err := cmd.Process.Signal(os.Kill); err != nil {
				t.Fatal(err)
			}
			go func() { _ = cmd.Wait(); close(waited) }()
			<-waited
			if when == "after-up" {
				// The lab outlives its creator: another process can load it
				// and its pods still serve.
				l, err := lab.Load(dir)
				if err != nil {
					t.Fatal(err)
				}
				web, err := l.Pod("shop/web-2")
				if err != nil {
					t.Fatal(err)
				}
				if r := get(t, l, "client/client-1", "http://"+web.IP+":8080/"); r.Pod != "shop/web-2" {
					t.Errorf("after the creator died, the request reached %s", r.Pod)
				}
			}
			mid := snapshot(t, id, dir)
			t.Logf("after SIGKILL %s, %d objects:\n%s", when, len(mid), strings.Join(mid, "\n"))
			if len(mid) == 0 {
				t.Fatal("nothing was created before the kill; the test proves nothing")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := lab.Down(ctx, dir); err != nil {
				t.Errorf("down: %v", err)
			}
			if after := snapshot(t, id, dir); len(after) != 0 {
				t.Errorf("after down, left behind: %v", after)
			}
			if left, err := lab.Leftovers(id); err != nil || len(left) != 0 {
				t.Errorf("Leftovers: %v %v", left, err)
			}
		})
	}
}

// TestLabHelperCreator is the child of TestLabDownAfterSIGKILL; it does
// nothing in a normal run.
func TestLabHelperCreator(t *testing.T) {
	id := os.Getenv("NODEMESH_LABTEST_CREATOR")
	if id == "" {
		t.Skip("helper process for TestLabDownAfterSIGKILL")
	}
	sp, err := examples.TwoNodesSpec()
	if err != nil {
		t.Fatal(err)
	}
	l, err := lab.Up(context.Background(), sp, lab.Options{StateDir: labtest.Dir(id), ID: id})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("LAB-IS-UP", l.ID())
	time.Sleep(10 * time.Minute)
}

// TestLabUpFailureLeavesNothing brings up a spec whose pod exits at once:
// Up must fail, name the pod and its log, and remove everything it built.
func TestLabUpFailureLeavesNothing(t *testing.T) {
	privtest.Root(t)
	labtest.SweepStale(t)
	sp, err := spec.Parse("broken.yaml", []byte(`
nodes: [{name: node-1}]
pods:
  - name: crasher
    node: node-1
    command: [sh, -c, "echo about to fail; exit 3"]
    ports: [{containerPort: 8080}]
`))
	if err != nil {
		t.Fatal(err)
	}
	id := labtest.NewID()
	dir := labtest.Dir(id)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, sp, lab.Options{StateDir: dir, ID: id})
	if err == nil {
		_ = l.Down(ctx)
		t.Fatal("Up succeeded with a pod that exits")
	}
	if !strings.Contains(err.Error(), "default/crasher") || !strings.Contains(err.Error(), "about to fail") {
		t.Errorf("the error should name the pod and show its log: %v", err)
	}
	if left := snapshot(t, id, dir); len(left) != 0 {
		t.Errorf("a failed Up left: %v", left)
	}
}
