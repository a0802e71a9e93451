package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/cni"
)

const prev04 = `{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-1"}],` +
	`"ips":[{"version":"4","address":"10.244.1.7/24","gateway":"10.244.1.1","interface":0}],"dns":{}}`

func conf(socket, prev string, extra string) string {
	s := `{"cniVersion":"0.4.0","name":"k8s-pod-network","type":"nodemesh-cni","socket":"` + socket + `",` +
		`"excludeNamespaces":["kube-system"],"timeout":"2s"` + extra
	if prev != "" {
		s += `,"prevResult":` + prev
	}
	return s + "}"
}

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func podEnv(cmd string) map[string]string {
	return map[string]string{
		"CNI_COMMAND": cmd, "CNI_CONTAINERID": "sandbox-1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0",
		"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=u-1",
	}
}

// runPlugin runs the plugin and returns its exit code, stdout and the
// decoded error document (when it failed).
func runPlugin(t *testing.T, env map[string]string, stdin string) (int, string, cniError) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(envOf(env), strings.NewReader(stdin), &out, &errOut)
	var ce cniError
	if code != 0 {
		if err := json.Unmarshal(out.Bytes(), &ce); err != nil {
			t.Fatalf("exit %d with stdout %q: not a CNI error document: %v", code, out.String(), err)
		}
		if ce.Msg == "" || ce.Code == 0 || ce.CNIVersion == "" {
			t.Fatalf("incomplete CNI error %+v", ce)
		}
	}
	return code, out.String(), ce
}

type agent struct {
	mu     sync.Mutex
	result string
	err    error
	got    []cni.Request
	forgot []string
}

func (a *agent) EnrollPod(_ context.Context, sb cni.Sandbox) (string, string, error) {
	sb.Netns.Close()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.got = append(a.got, sb.Request)
	return a.result, "test", a.err
}

func (a *agent) Forget(uid, ns, name, cid string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.forgot = append(a.forgot, ns+"/"+name+"@"+cid)
}

func startAgent(t *testing.T, a *agent) string {
	t.Helper()
	uid := uint32(os.Getuid())
	sock := filepath.Join(t.TempDir(), "nodemesh", "cni.sock")
	s, err := cni.NewServer(cni.ServerConfig{Path: sock, Enroller: a, AllowUID: &uid})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := s.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

func TestAddEnrolledPassesResultThrough(t *testing.T) {
	a := &agent{result: cni.ResultEnrolled}
	sock := startAgent(t, a)
	code, out, ce := runPlugin(t, podEnv("ADD"), conf(sock, prev04, ""))
	if code != 0 {
		t.Fatalf("ADD failed: %+v", ce)
	}
	var got, want map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	_ = json.Unmarshal([]byte(prev04), &want)
	gb, _ := json.Marshal(got)
	wb, _ := json.Marshal(want)
	if !bytes.Equal(gb, wb) {
		t.Fatalf("result\n%s\nwant the previous result\n%s", gb, wb)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.got) != 1 {
		t.Fatalf("agent got %d requests", len(a.got))
	}
	r := a.got[0]
	if r.Pod() != "shop/web-0" || r.UID != "u-1" || r.ContainerID != "sandbox-1" || len(r.IPs) != 1 || r.IPs[0] != netip.MustParseAddr("10.244.1.7") {
		t.Fatalf("request %+v", r)
	}
}

func TestAddSkippedPassesThrough(t *testing.T) {
	sock := startAgent(t, &agent{result: cni.ResultSkipped})
	if code, _, ce := runPlugin(t, podEnv("ADD"), conf(sock, prev04, "")); code != 0 {
		t.Fatalf("ADD of a pod the agent does not mesh failed: %+v", ce)
	}
}

func TestAddFailsClosed(t *testing.T) {
	down := filepath.Join(t.TempDir(), "no-agent.sock")
	refusing := startAgent(t, &agent{err: errors.New("capture failed: no listener")})
	odd := startAgent(t, &agent{result: "maybe"})
	noNetns := podEnv("ADD")
	delete(noNetns, "CNI_NETNS")
	badNetns := podEnv("ADD")
	badNetns["CNI_NETNS"] = "/proc/self/status"
	noContainer := podEnv("ADD")
	delete(noContainer, "CNI_CONTAINERID")
	badArgs := podEnv("ADD")
	badArgs["CNI_ARGS"] = "K8S_POD_NAMESPACE=shop;garbage"
	for _, tc := range []struct {
		name  string
		env   map[string]string
		stdin string
		code  int
		msg   string
	}{
		{"agent down", podEnv("ADD"), conf(down, prev04, ""), codeTryAgainLater, "not reachable"},
		{"agent refuses", podEnv("ADD"), conf(refusing, prev04, ""), codeNotEnrolled, "capture failed"},
		{"agent answers oddly", podEnv("ADD"), conf(odd, prev04, ""), codeNotEnrolled, "unexpected answer"},
		{"bad JSON", podEnv("ADD"), `{"cniVersion":`, codeDecoding, "decoding the network configuration"},
		{"empty stdin", podEnv("ADD"), ``, codeDecoding, "no network configuration"},
		{"no cniVersion", podEnv("ADD"), `{"type":"nodemesh-cni","prevResult":{}}`, codeInvalidConfig, "no cniVersion"},
		{"unsupported version", podEnv("ADD"), `{"cniVersion":"9.9.9","prevResult":{}}`, codeIncompatibleVersion, "not supported"},
		{"no prevResult", podEnv("ADD"), conf(down, "", ""), codeInvalidConfig, "chained after"},
		{"prevResult not an object", podEnv("ADD"), conf(down, `[1]`, ""), codeDecoding, "prevResult"},
		{"bad address", podEnv("ADD"), conf(down, `{"ips":[{"address":"10.0.0.300/24"}]}`, ""), codeDecoding, "10.0.0.300"},
		{"missing netns", noNetns, conf(down, prev04, ""), codeInvalidEnv, "CNI_NETNS is empty"},
		{"netns not a namespace", badNetns, conf(down, prev04, ""), codeInvalidEnv, "CNI_NETNS"},
		{"missing container ID", noContainer, conf(down, prev04, ""), codeInvalidEnv, "CNI_CONTAINERID"},
		{"bad CNI_ARGS", badArgs, conf(down, prev04, ""), codeInvalidEnv, "KEY=VALUE"},
		{"relative socket", podEnv("ADD"), conf("run/x.sock", prev04, ""), codeInvalidConfig, "absolute"},
		{"bad timeout", podEnv("ADD"), conf(down, prev04, `,"timeout":"soon"`), codeInvalidConfig, "timeout"},
		{"unknown command", podEnv("FROB"), conf(down, prev04, ""), codeInvalidEnv, "FROB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, ce := runPlugin(t, tc.env, tc.stdin)
			if code == 0 || ce.Code != tc.code || !strings.Contains(ce.Error(), tc.msg) {
				t.Fatalf("exit %d, error %+v; want code %d with %q", code, ce, tc.code, tc.msg)
			}
		})
	}
}

func TestAddPassesWithoutAgent(t *testing.T) {
	down := filepath.Join(t.TempDir(), "no-agent.sock")
	notPod := podEnv("ADD")
	delete(notPod, "CNI_ARGS")
	excluded := podEnv("ADD")
	excluded["CNI_ARGS"] = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0;K8S_POD_UID=u-2"
	for name, env := range map[string]map[string]string{"not a Kubernetes pod": notPod, "excluded namespace": excluded} {
		t.Run(name, func(t *testing.T) {
			code, out, ce := runPlugin(t, env, conf(down, prev04, ""))
			if code != 0 || !strings.Contains(out, "10.244.1.7/24") {
				t.Fatalf("exit %d (%+v), stdout %q: want the previous result", code, ce, out)
			}
		})
	}
}

// TestAddWithAgentDown: with the agent unreachable, only a pod of a
// namespace the agent's last namespace table lists outside the mesh
// starts; a meshed or unknown namespace, a missing or broken table, and
// holdWhenAgentDown "all" hold the pod back (code 11).
func TestAddWithAgentDown(t *testing.T) {
	dir := t.TempDir()
	down := filepath.Join(dir, "no-agent.sock")
	table := cni.NamespaceTablePath(down)
	inNS := func(ns string) map[string]string {
		env := podEnv("ADD")
		env["CNI_ARGS"] = "K8S_POD_NAMESPACE=" + ns + ";K8S_POD_NAME=p-0;K8S_POD_UID=u-9"
		return env
	}
	writeTable := func() {
		t.Helper()
		if err := cni.WriteNamespaceTable(table, cni.NamespaceTable{Written: time.Now(), Meshed: []string{"shop"}, Unmeshed: []string{"tools"}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		setup func()
		env   map[string]string
		extra string
		start bool
		msg   string
	}{
		{"no table", func() { _ = os.Remove(table) }, inNS("tools"), "", false, "cannot tell"},
		{"unmeshed namespace", writeTable, inNS("tools"), "", true, ""},
		{"meshed namespace", writeTable, inNS("shop"), "", false, "namespace shop is in the mesh"},
		{"namespace the table does not know", writeTable, inNS("new"), "", false, "namespace new is in the mesh (or unknown)"},
		{"hold all", writeTable, inNS("tools"), `,"holdWhenAgentDown":"all"`, false, "holdWhenAgentDown: all"},
		{"broken table", func() { _ = os.WriteFile(table, []byte(`{"version":1,"unmeshed":["tools"`), 0o600) }, inNS("tools"), "", false, "cannot tell"},
		{"table of another version", func() { _ = os.WriteFile(table, []byte(`{"version":7,"unmeshed":["tools"]}`), 0o600) }, inNS("tools"), "", false, "format version 7"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.setup()
			code, out, ce := runPlugin(t, tc.env, conf(down, prev04, tc.extra))
			if tc.start {
				if code != 0 || !strings.Contains(out, "10.244.1.7/24") {
					t.Fatalf("exit %d (%+v), stdout %q: want the previous result", code, ce, out)
				}
				return
			}
			if code == 0 || ce.Code != codeTryAgainLater || !strings.Contains(ce.Error(), tc.msg) {
				t.Fatalf("exit %d, error %+v; want code %d with %q", code, ce, codeTryAgainLater, tc.msg)
			}
		})
	}
	if code, _, ce := runPlugin(t, inNS("tools"), conf(down, prev04, `,"holdWhenAgentDown":"some"`)); code == 0 || ce.Code != codeInvalidConfig {
		t.Fatalf("holdWhenAgentDown some: exit %d, %+v; want an invalid-configuration error", code, ce)
	}
}

func TestAddWaitsNoLongerThanTimeout(t *testing.T) {
	// An agent that never answers: the plugin gives up at its timeout.
	a := &slowAgent{}
	uid := uint32(os.Getuid())
	sock := filepath.Join(t.TempDir(), "cni.sock")
	s, err := cni.NewServer(cni.ServerConfig{Path: sock, Enroller: a, AllowUID: &uid, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := s.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()
	start := time.Now()
	code, _, ce := runPlugin(t, podEnv("ADD"), conf(sock, prev04, `,"timeout":"200ms"`))
	if code == 0 || ce.Code != codeNotEnrolled || time.Since(start) > 5*time.Second {
		t.Fatalf("exit %d, %+v after %s", code, ce, time.Since(start))
	}
}

type slowAgent struct{}

func (slowAgent) EnrollPod(ctx context.Context, sb cni.Sandbox) (string, string, error) {
	sb.Netns.Close()
	<-ctx.Done()
	return "", "", ctx.Err()
}
func (slowAgent) Forget(string, string, string, string) {}

func TestDelAlwaysSucceeds(t *testing.T) {
	a := &agent{}
	sock := startAgent(t, a)
	if code, out, ce := runPlugin(t, podEnv("DEL"), conf(sock, "", "")); code != 0 || out != "" {
		t.Fatalf("DEL: exit %d, %+v, stdout %q", code, ce, out)
	}
	a.mu.Lock()
	if len(a.forgot) != 1 || a.forgot[0] != "shop/web-0@sandbox-1" {
		t.Errorf("agent forgot %v", a.forgot)
	}
	a.mu.Unlock()
	down := filepath.Join(t.TempDir(), "no-agent.sock")
	if code, _, ce := runPlugin(t, podEnv("DEL"), conf(down, "", "")); code != 0 {
		t.Fatalf("DEL without an agent failed: %+v", ce)
	}
}

func TestVersionAndCheck(t *testing.T) {
	code, out, _ := runPlugin(t, map[string]string{"CNI_COMMAND": "VERSION"}, "")
	if code != 0 || !strings.Contains(out, `"1.0.0"`) || !strings.Contains(out, `"0.4.0"`) {
		t.Fatalf("VERSION: exit %d, %q", code, out)
	}
	if code, _, ce := runPlugin(t, podEnv("CHECK"), conf("/x.sock", prev04, "")); code != 0 {
		t.Fatalf("CHECK: %+v", ce)
	}
	var out2, errOut bytes.Buffer
	if code := run(envOf(nil), strings.NewReader(""), &out2, &errOut); code != 2 || !strings.Contains(errOut.String(), "CNI plugin") {
		t.Fatalf("run by hand: exit %d, stderr %q", code, errOut.String())
	}
}

func TestParseArgs(t *testing.T) {
	a, err := parseArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_UID=c;;")
	if err != nil || a != (podArgs{Namespace: "a", Name: "b", UID: "c"}) {
		t.Fatalf("%+v, %v", a, err)
	}
	for _, bad := range []string{"novalue", "=x", "K8S_POD_NAME=b;x"} {
		if _, err := parseArgs(bad); err == nil {
			t.Errorf("parseArgs(%q) accepted", bad)
		}
	}
}

func TestPrevIPs(t *testing.T) {
	ips, err := prevIPs(json.RawMessage(`{"ips":[{"address":"10.1.0.5/24"},{"address":"fd00::5/64"},{"address":"10.1.0.5/24"}]}`))
	if err != nil || len(ips) != 2 || ips[0].String() != "10.1.0.5" || ips[1].String() != "fd00::5" {
		t.Fatalf("%v, %v", ips, err)
	}
	if _, err := prevIPs(json.RawMessage(`{"ips":[{"address":"10.1.0.5"}]}`)); err == nil {
		t.Error("an address without prefix length accepted")
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(conf("/run/x.sock", prev04, "")), "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b")
	f.Add([]byte(`{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"::/0"}]}}`), "=;;=")
	f.Fuzz(func(t *testing.T, b []byte, args string) {
		c, err := parseConf(b)
		if err == nil && len(c.PrevResult) > 0 {
			_, _ = prevIPs(c.PrevResult)
			_, _ = passThrough(c)
		}
		_, _ = parseArgs(args)
	})
}
