package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/agent/cni"
	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
)

// TestLabCNIEnrollsBeforeFirstProcess runs the nodemesh CNI plugin as the
// container runtime would at sandbox creation, for a pod whose network
// namespace exists but holds no process yet and whose address the API does
// not have yet (kubelet writes it after the sandbox): when ADD returns, the
// agent must already serve the pod (its HBONE listener answers inside the
// namespace, capture reports it), although nothing ever ran there. Then the
// plugin fails closed when the agent is gone, and the agent leaves no
// socket behind, but the namespace table it left lets a pod of a namespace
// outside the mesh start (and without the table that pod waits too).
func TestLabCNIEnrollsBeforeFirstProcess(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	plugin := labtest.GoBuild(t, "./cmd/nodemesh-cni")
	setMode(t, ctx, l, "shop", state.ModeEnabled)
	sockDir := filepath.Join(l.StateDir(), "cni-node-1")
	sock := filepath.Join(sockDir, "cni.sock")
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin,
		AgentArgsByNode: map[string][]string{"node-1": {"--cni-socket", sock}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Stop(context.Background()); err != nil {
			t.Errorf("stopping the mesh: %v", err)
		}
	})
	if st, err := os.Stat(sockDir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("socket directory %s: mode %v, err %v; want 0700", sockDir, st.Mode().Perm(), err)
	}

	// The new pod's sandbox: a network namespace with its address and no
	// process, as after the network plugin's ADD.
	ns := fmt.Sprintf("nmtcni-%d", os.Getpid())
	nsPath := "/run/netns/" + ns
	podIP := "10.244.1.200"
	ipCmd := func(args ...string) {
		t.Helper()
		if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ipCmd("netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	// A veth whose other end stays in the host (it goes with the
	// namespace); the address is all capture needs.
	host := fmt.Sprintf("nmtc%d", os.Getpid())
	ipCmd("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", host).Run() })
	ipCmd("link", "set", host, "up")
	ipCmd("-n", ns, "link", "set", "lo", "up")
	ipCmd("-n", ns, "addr", "add", podIP+"/24", "dev", "eth0")
	ipCmd("-n", ns, "link", "set", "eth0", "up")

	pods := l.Server.Client.CoreV1().Pods("shop")
	pod, err := pods.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "cni-new", Labels: map[string]string{"app": "cni-new"}},
		Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "web",
			Containers: []corev1.Container{{Name: "app", Image: "app"}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pods.Delete(context.Background(), "cni-new", metav1.DeleteOptions{}) })

	hbone := func() error {
		d := inpod.Dialer{Netns: nsPath}
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		c, err := d.DialContext(dctx, "tcp", net.JoinHostPort(podIP, "15008"))
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := hbone(); err == nil {
		t.Fatal("something listens on the new pod's 15008 before its CNI ADD")
	}

	conf := func(socket string) string {
		return `{"cniVersion":"1.0.0","name":"lab","type":"nodemesh-cni","socket":"` + socket + `","timeout":"60s",` +
			`"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"` + nsPath + `"}],"ips":[{"address":"` + podIP + `/24","interface":0}]}}`
	}
	cniRun := func(cmd, socket, podName, uid string) (int, string, time.Duration) {
		t.Helper()
		c := exec.CommandContext(ctx, plugin)
		c.Env = []string{"CNI_COMMAND=" + cmd, "CNI_CONTAINERID=sandbox-" + podName, "CNI_NETNS=" + nsPath, "CNI_IFNAME=eth0",
			"CNI_PATH=/usr/lib/cni", "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=" + podName + ";K8S_POD_UID=" + uid}
		c.Stdin = strings.NewReader(conf(socket))
		var out bytes.Buffer
		c.Stdout, c.Stderr = &out, &out
		start := time.Now()
		err := c.Run()
		took := time.Since(start)
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), out.String(), took
		}
		if err != nil {
			t.Fatalf("running the plugin: %v", err)
		}
		return 0, out.String(), took
	}

	code, out, took := cniRun("ADD", sock, "cni-new", string(pod.UID))
	if code != 0 {
		t.Fatalf("ADD: exit %d: %s", code, out)
	}
	if !strings.Contains(out, podIP+"/24") {
		t.Fatalf("ADD did not pass the previous result through: %s", out)
	}
	// Right after ADD, before any process: the agent serves the pod.
	if err := hbone(); err != nil {
		t.Fatalf("the pod's HBONE listener does not answer right after ADD: %v", err)
	}
	if pids := pidsIn(t, nsPath); len(pids) > 0 {
		t.Fatalf("processes %v run in the pod's namespace; the test needs it empty", pids)
	}
	cs, err := m.Capture(ctx, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	found := ""
	for _, p := range cs.Pods {
		if p.Pod == "shop/cni-new" {
			found = p.Status
		}
	}
	if found != "enrolled" && found != "verified" {
		t.Fatalf("capture status of shop/cni-new %q after ADD; pods %+v", found, cs.Pods)
	}
	t.Logf("ADD returned after %s with the pod %s, no process in its namespace", took.Round(time.Millisecond), found)

	// A pod of a namespace outside the mesh passes at once.
	plainPod, err := l.Server.Client.CoreV1().Pods("client").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "cni-plain"},
		Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "client", Containers: []corev1.Container{{Name: "app", Image: "app"}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = l.Server.Client.CoreV1().Pods("client").Delete(context.Background(), "cni-plain", metav1.DeleteOptions{})
	})
	addPlain := func() (string, error) {
		c := exec.CommandContext(ctx, plugin)
		c.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=sandbox-plain", "CNI_NETNS=" + nsPath, "CNI_IFNAME=eth0",
			"CNI_ARGS=K8S_POD_NAMESPACE=client;K8S_POD_NAME=cni-plain;K8S_POD_UID=" + string(plainPod.UID)}
		c.Stdin = strings.NewReader(conf(sock))
		var out bytes.Buffer
		c.Stdout = &out
		err := c.Run()
		return out.String(), err
	}
	if out, err := addPlain(); err != nil {
		t.Fatalf("ADD of a pod outside the mesh: %v\n%s", err, out)
	}
	// The agent keeps the plugin's namespace table beside the socket,
	// root-only, for the plugin to read while the agent is down.
	table := cni.NamespaceTablePath(sock)
	var nst cni.NamespaceTable
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if nst, err = cni.ReadNamespaceTable(table); err == nil && slices.Contains(nst.Meshed, "shop") && slices.Contains(nst.Unmeshed, "client") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("namespace table %s: %+v, err %v; want shop meshed and client not", table, nst, err)
		}
	}
	if st, err := os.Stat(table); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("namespace table %s: mode %v, err %v; want 0600", table, st.Mode().Perm(), err)
	}

	// DEL: the agent drops the sandbox; the pod is no longer served from it.
	if code, out, _ := cniRun("DEL", sock, "cni-new", string(pod.UID)); code != 0 {
		t.Fatalf("DEL: exit %d: %s", code, out)
	}

	// The agent stops: its socket goes, and ADD fails closed with "try
	// again later" (CNI code 11) so kubelet retries the sandbox.
	if err := l.StopNodeProcess(ctx, "node-1", mesh.AgentProcess, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the stopped agent left its CNI socket %s (err %v)", sock, err)
	}
	code, out, _ = cniRun("ADD", sock, "cni-new", string(pod.UID))
	var ce struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	}
	if code == 0 || json.Unmarshal([]byte(out), &ce) != nil || ce.Code != 11 {
		t.Fatalf("ADD with the agent down: exit %d, %s; want a CNI error with code 11", code, out)
	}
	t.Logf("agent down: %s", ce.Msg)
	// The pod of a namespace outside the mesh still starts, from the
	// table the agent left; without the table it waits too.
	if out, err := addPlain(); err != nil {
		t.Fatalf("ADD of a pod outside the mesh with the agent down: %v\n%s", err, out)
	}
	if err := os.Remove(table); err != nil {
		t.Fatal(err)
	}
	out, err = addPlain()
	if err == nil || json.Unmarshal([]byte(out), &ce) != nil || ce.Code != 11 {
		t.Fatalf("ADD of a pod outside the mesh with the agent down and no namespace table: %v, %s; want a CNI error with code 11", err, out)
	}
}

// pidsIn lists the processes whose network namespace is the one at path.
func pidsIn(t *testing.T, path string) []int {
	t.Helper()
	var want syscall.Stat_t
	if err := syscall.Stat(path, &want); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st) == nil && st.Ino == want.Ino && st.Dev == want.Dev {
			out = append(out, pid)
		}
	}
	return out
}
