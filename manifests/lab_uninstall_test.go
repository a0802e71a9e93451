package manifests_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/manifests"
)

// TestLabInstallUninstall installs the default manifests into the two-node
// lab for real, runs the CA and an agent per node the way the Deployment
// and DaemonSet would (their arguments, each with its own service-account
// token, so the whole data plane runs under the manifests' RBAC), enrolls
// the lab's namespaces and waits until every agent is ready (SVIDs issued,
// capture verified on every pod). Then it follows the uninstall procedure
// of docs/install.md and checks every lab node: after un-enrolling, no
// sk_lookup program is left in any pod; after the agents stop, capture
// stays (fail closed); after the cleanup DaemonSet's script, no program or
// pin is left on any node.
func TestLabInstallUninstall(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c := clusterOf(t, l.Server)
	admin := l.Server.Client

	def, err := manifests.Render(".")
	if err != nil {
		t.Fatal(err)
	}
	var crds []string
	for _, o := range def {
		if o.GetKind() == "CustomResourceDefinition" {
			if err := c.apply(ctx, o, false); err != nil {
				t.Fatal(err)
			}
			crds = append(crds, o.GetName())
		}
	}
	for _, name := range crds {
		waitEstablished(ctx, t, c.dyn, name)
	}
	c.mapper.Reset()
	for _, o := range def {
		if err := c.apply(ctx, o, false); err != nil {
			t.Fatal(err)
		}
	}
	var ds appsv1.DaemonSet
	var dep appsv1.Deployment
	var cm corev1.ConfigMap
	for _, o := range def {
		switch o.GetKind() {
		case "DaemonSet":
			mustConvert(t, o, &ds)
		case "Deployment":
			mustConvert(t, o, &dep)
		case "ConfigMap":
			if o.GetName() == "nodemesh-config" {
				mustConvert(t, o, &cm)
			}
		}
	}

	dir := t.TempDir()
	build := func(pkg string) string {
		out := filepath.Join(dir, filepath.Base(pkg))
		if b, err := exec.CommandContext(ctx, goTool(), "build", "-o", out, pkg).CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", pkg, err, b)
		}
		return out
	}
	agentBin, caBin := build("../cmd/nodemesh-agent"), build("../cmd/nodemesh-ca")
	t.Log("installed; binaries built")

	// The CA, on node-1, as the Deployment runs it.
	node1, err := l.Node("node-1")
	if err != nil {
		t.Fatal(err)
	}
	caAddr := net.JoinHostPort(node1.IP, fmt.Sprint(identity.DefaultPort))
	caArgs := overrideFlags(t, expandArgs(t, dep.Spec.Template.Spec.Containers[0], &cm, map[string]string{"metadata.namespace": ns}),
		map[string]string{"listen": caAddr})
	caArgs = append(caArgs, "--kubeconfig="+labKubeconfig(t, l, token(ctx, t, admin, dep.Spec.Template.Spec.ServiceAccountName, nil, nil), filepath.Join(dir, "ca.kubeconfig")))
	caProc, err := l.StartNodeProcess(ctx, "node-1", "nodemesh-ca", append([]string{caBin}, caArgs...), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { logTail(t, "nodemesh-ca", caProc.Log) })
	t.Log("CA started")

	// An agent per node, as the DaemonSet runs it.
	agents := map[string]lab.Process{}
	for _, n := range l.Nodes() {
		pod, err := admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "nodemesh-agent-" + n.Name, Labels: ds.Spec.Template.Labels},
			Spec: corev1.PodSpec{NodeName: n.Name, ServiceAccountName: ds.Spec.Template.Spec.ServiceAccountName, HostNetwork: true,
				Containers: []corev1.Container{{Name: "agent", Image: ds.Spec.Template.Spec.Containers[0].Image}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pod.Status.Phase = corev1.PodRunning
		if pod, err = admin.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		tokenFile := filepath.Join(dir, "ca-token-"+n.Name)
		if err := os.WriteFile(tokenFile, []byte(token(ctx, t, admin, pod.Spec.ServiceAccountName, []string{identity.Audience}, pod)), 0o600); err != nil {
			t.Fatal(err)
		}
		args := overrideFlags(t, expandArgs(t, ds.Spec.Template.Spec.Containers[0], &cm, map[string]string{
			"spec.nodeName": n.Name, "metadata.namespace": ns, "metadata.name": pod.Name,
		}), map[string]string{
			"ca-addr":       "https://" + caAddr,
			"ca-token-file": tokenFile,
			"bpf-pin-dir":   pinDir(l, n),
			// The lab plays kubelet through pod annotations; real nodes use proc.
			"pod-netns": "annotations",
			// Each node's CNI socket and directories, private to this test
			// (nothing is chained: no network configuration).
			"cni-socket":   filepath.Join(dir, "cni-"+n.Name, "cni.sock"),
			"cni-conf-dir": t.TempDir(),
			"cni-bin-dir":  t.TempDir(),
		})
		args = append(args, "--cgroup-root="+n.Cgroup,
			"--kubeconfig="+labKubeconfig(t, l, token(ctx, t, admin, pod.Spec.ServiceAccountName, nil, nil), filepath.Join(dir, "agent-"+n.Name+".kubeconfig")))
		p, err := l.StartNodeProcess(ctx, n.Name, "nodemesh-agent", append([]string{agentBin}, args...), nil)
		if err != nil {
			t.Fatal(err)
		}
		agents[n.Name] = p
	}
	stopped := false
	t.Cleanup(func() {
		for node, p := range agents {
			if !stopped {
				_ = l.StopNodeProcess(context.Background(), node, "nodemesh-agent", 10*time.Second)
			}
			logTail(t, "nodemesh-agent on "+node, p.Log)
		}
	})

	t.Log("agents started")
	// Enroll every namespace with pods; wait for the agents.
	labNamespaces := map[string]bool{}
	for _, p := range l.Pods() {
		labNamespaces[p.Namespace] = true
	}
	for nsName := range labNamespaces {
		setModeLabel(ctx, t, l, nsName, "enabled")
	}
	for _, n := range l.Nodes() {
		waitfor.NoError(t, 2*time.Minute, "agent on "+n.Name+" ready", func() error { return agentReady(n) })
	}
	pods := l.Pods()
	for _, p := range pods {
		if got := attachedCount(t, p.Netns, ebpf.AttachSkLookup); got == 0 {
			t.Errorf("enrolled pod %s/%s has no sk_lookup program", p.Namespace, p.Name)
		}
	}
	nodeHooks := []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect, ebpf.AttachCGroupSockOps}
	for _, n := range l.Nodes() {
		for _, h := range nodeHooks {
			if attachedCount(t, n.Cgroup, h) == 0 {
				t.Errorf("node %s: no %s program on its pods' cgroup", n.Name, h)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// Uninstall 1: un-enroll; every pod gets plain networking back.
	for nsName := range labNamespaces {
		unlabel(ctx, t, l, nsName)
	}
	for _, p := range pods {
		waitfor.NoError(t, time.Minute, "pod "+p.Namespace+"/"+p.Name+" released", func() error {
			if got := attachedCount(t, p.Netns, ebpf.AttachSkLookup); got != 0 {
				return fmt.Errorf("%d sk_lookup programs left", got)
			}
			return nil
		})
	}

	// Uninstall 2: the DaemonSet is deleted; capture stays (fail closed).
	for node := range agents {
		if err := l.StopNodeProcess(ctx, node, "nodemesh-agent", 40*time.Second); err != nil {
			t.Errorf("stopping the agent on %s: %v", node, err)
		}
	}
	stopped = true
	for _, n := range l.Nodes() {
		if attachedCount(t, n.Cgroup, ebpf.AttachCGroupInet4Connect) == 0 {
			t.Errorf("node %s: capture detached when the agent stopped; it must stay until the cleanup", n.Name)
		}
	}

	// Uninstall 3: the cleanup DaemonSet's script on every node.
	un, err := manifests.Render(uninstall)
	if err != nil {
		t.Fatal(err)
	}
	var cleanup appsv1.DaemonSet
	for _, o := range un {
		if o.GetKind() == "DaemonSet" {
			mustConvert(t, o, &cleanup)
		}
	}
	ctr := cleanup.Spec.Template.Spec.Containers[0]
	script := strings.Replace(ctr.Command[len(ctr.Command)-1], "exec sleep 2147483647", "exit 0", 1)
	for _, n := range l.Nodes() {
		cmd := exec.CommandContext(ctx, ctr.Command[0], append(append([]string{}, ctr.Command[1:len(ctr.Command)-1]...), script)...)
		cmd.Env = append(os.Environ(), "PIN_DIR="+pinDir(l, n))
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "node clean") {
			t.Fatalf("cleanup on %s: %v\n%s", n.Name, err, out)
		}
	}
	for _, n := range l.Nodes() {
		for _, h := range nodeHooks {
			waitfor.NoError(t, 10*time.Second, fmt.Sprintf("node %s: %s detached", n.Name, h), func() error {
				if got := attachedCount(t, n.Cgroup, h); got != 0 {
					return fmt.Errorf("%d programs left", got)
				}
				return nil
			})
		}
		if _, err := os.Stat(pinDir(l, n)); !os.IsNotExist(err) {
			t.Errorf("node %s: pins left at %s (%v)", n.Name, pinDir(l, n), err)
		}
	}
	for _, p := range pods {
		if got := attachedCount(t, p.Netns, ebpf.AttachSkLookup); got != 0 {
			t.Errorf("pod %s/%s: %d sk_lookup programs left after uninstall", p.Namespace, p.Name, got)
		}
	}
}

func pinDir(l *lab.Lab, n lab.Node) string { return filepath.Join(l.BPFDir(), "agent-"+n.Name) }

// overrideFlags replaces the values of --name=value flags; every name must
// be present, so a renamed flag in the manifest fails the test.
func overrideFlags(t *testing.T, args []string, set map[string]string) []string {
	t.Helper()
	left := map[string]string{}
	for k, v := range set {
		left[k] = v
	}
	out := append([]string{}, args...)
	for i, a := range out {
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if v, ok := left[name]; ok {
			out[i] = "--" + name + "=" + v
			delete(left, name)
		}
	}
	if len(left) > 0 {
		t.Fatalf("the manifest lacks flags %v", left)
	}
	return out
}

// labKubeconfig writes a kubeconfig for node processes (the lab's server
// address) that authenticates with token.
func labKubeconfig(t *testing.T, l *lab.Lab, token, path string) string {
	t.Helper()
	cfg, err := clientcmd.LoadFromFile(l.Kubeconfig())
	if err != nil {
		t.Fatal(err)
	}
	cur := cfg.Contexts[cfg.CurrentContext]
	if cur == nil || cfg.Clusters[cur.Cluster] == nil {
		t.Fatalf("lab kubeconfig %s has no current cluster", l.Kubeconfig())
	}
	out := clientcmdapi.NewConfig()
	out.Clusters["lab"] = cfg.Clusters[cur.Cluster]
	out.AuthInfos["sa"] = &clientcmdapi.AuthInfo{Token: token}
	out.Contexts["lab"] = &clientcmdapi.Context{Cluster: "lab", AuthInfo: "sa"}
	out.CurrentContext = "lab"
	if err := clientcmd.WriteToFile(*out, path); err != nil {
		t.Fatal(err)
	}
	return path
}

func setModeLabel(ctx context.Context, t *testing.T, l *lab.Lab, name, mode string) {
	t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"labels":{"nodemesh.io/mode":%q}}}`, mode)
	if _, err := l.Server.Client.CoreV1().Namespaces().Patch(ctx, name, "application/merge-patch+json", []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("labelling namespace %s: %v", name, err)
	}
}

func unlabel(ctx context.Context, t *testing.T, l *lab.Lab, name string) {
	t.Helper()
	patch := `{"metadata":{"labels":{"nodemesh.io/mode":null}}}`
	if _, err := l.Server.Client.CoreV1().Namespaces().Patch(ctx, name, "application/merge-patch+json", []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("unlabelling namespace %s: %v", name, err)
	}
}

// agentReady asks the agent's readiness endpoint inside the node's network
// namespace.
func agentReady(n lab.Node) error {
	d := &inpod.Dialer{Netns: n.Netns}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		DisableKeepAlives: true,
	}}
	resp, err := hc.Get("http://127.0.0.1:15021/healthz/ready")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	return nil
}

func attachedCount(t *testing.T, target string, typ ebpf.AttachType) int {
	t.Helper()
	return attached(t, target, typ)
}

func logTail(t *testing.T, what, path string) {
	t.Helper()
	if !t.Failed() {
		return
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Logf("%s log: %v", what, err)
		return
	}
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	t.Logf("%s log (tail):\n%s", what, b)
}
