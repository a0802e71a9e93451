package nodeinfo

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const (
	uidA  = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
	uidA_ = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0"
	cid   = "5e3c0b2e9f1d4a7b8c6d5e4f3a2b1c0d5e3c0b2e9f1d4a7b8c6d5e4f3a2b1c0d"
)

func TestParsePodCgroup(t *testing.T) {
	tests := []struct {
		name, content    string
		wantUID, wantPod string
		wantV2, wantOK   bool
	}{
		{"containerd systemd v2 burstable",
			"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n",
			uidA, "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidA_ + ".slice", true, true},
		{"containerd systemd v2 guaranteed",
			"0::/kubepods.slice/kubepods-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n",
			uidA, "/kubepods.slice/kubepods-pod" + uidA_ + ".slice", true, true},
		{"cri-o systemd v2 besteffort",
			"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice/crio-" + cid + ".scope\n",
			uidA, "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice", true, true},
		{"cri-o conmon (in the pod cgroup, host netns)",
			"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice/crio-conmon-" + cid + ".scope\n",
			uidA, "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice", true, true},
		{"containerd cgroupfs v2",
			"0::/kubepods/besteffort/pod" + uidA + "/" + cid + "\n",
			uidA, "/kubepods/besteffort/pod" + uidA, true, true},
		{"cgroupfs v2 guaranteed",
			"0::/kubepods/pod" + uidA + "/" + cid + "\n",
			uidA, "/kubepods/pod" + uidA, true, true},
		{"docker cgroupfs v1",
			"12:pids:/kubepods/burstable/pod" + uidA + "/" + cid + "\n" +
				"11:cpu,cpuacct:/kubepods/burstable/pod" + uidA + "/" + cid + "\n" +
				"1:name=systemd:/kubepods/burstable/pod" + uidA + "/" + cid + "\n",
			uidA, "/kubepods/burstable/pod" + uidA, false, true},
		{"cri-dockerd systemd v1",
			"4:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidA_ + ".slice/docker-" + cid + ".scope\n" +
				"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidA_ + ".slice/docker-" + cid + ".scope\n",
			uidA, "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidA_ + ".slice", false, true},
		{"hybrid, systemd driver (v2 line mirrors)",
			"12:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n" +
				"1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n" +
				"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n",
			uidA, "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice", true, true},
		{"hybrid, cgroupfs driver (v2 line at the root)",
			"12:pids:/kubepods/besteffort/pod" + uidA + "/" + cid + "\n0::/\n",
			uidA, "/kubepods/besteffort/pod" + uidA, false, true},
		{"kind (kubelet nested in a node container)",
			"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n",
			uidA, "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidA_ + ".slice", true, true},
		// The UID is found; the path stays relative to the namespace
		// (Hierarchy.Dir maps it only from the node's view, see NodeView).
		{"seen from a private cgroup namespace",
			"0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n",
			uidA, "/../../kubepods-besteffort.slice/kubepods-besteffort-pod" + uidA_ + ".slice", true, true},
		{"upper-case UID is normalised",
			"0::/kubepods/pod0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0/" + cid + "\n",
			uidA, "/kubepods/pod0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", true, true},
		{"kubelet itself", "0::/system.slice/kubelet.service\n", "", "", false, false},
		{"the runtime", "0::/system.slice/containerd.service\n", "", "", false, false},
		{"kubepods but no pod (QoS parent)", "0::/kubepods.slice/kubepods-burstable.slice\n", "", "", false, false},
		{"pod-like name outside kubepods", "0::/system.slice/pod" + uidA + "/x\n", "", "", false, false},
		{"not a UID", "0::/kubepods/podnotauid/x\n", "", "", false, false},
		{"short UID", "0::/kubepods.slice/kubepods-pod0f1e2d3c_4b5a.slice/x\n", "", "", false, false},
		{"garbage", "no colons here\n::\n", "", "", false, false},
		{"empty", "", "", "", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := ParsePodCgroup(tt.content)
			if ok != tt.wantOK {
				t.Fatalf("ok = %v, want %v (%+v)", ok, tt.wantOK, got)
			}
			if !ok {
				return
			}
			if got.UID != tt.wantUID || got.PodPath != tt.wantPod || got.V2 != tt.wantV2 {
				t.Errorf("got UID %q PodPath %q V2 %v, want %q %q %v", got.UID, got.PodPath, got.V2, tt.wantUID, tt.wantPod, tt.wantV2)
			}
		})
	}
}

func FuzzParsePodCgroup(f *testing.F) {
	f.Add("0::/kubepods.slice/kubepods-pod" + uidA_ + ".slice/cri-containerd-" + cid + ".scope\n")
	f.Add("1:name=systemd:/kubepods/pod" + uidA + "/x\n0::/\n")
	f.Fuzz(func(t *testing.T, s string) {
		pc, ok := ParsePodCgroup(s)
		if ok && (!isUID(pc.UID) || pc.PodPath == "" || len(pc.PodPath) > len(pc.Path)) {
			t.Fatalf("ParsePodCgroup(%q) = %+v", s, pc)
		}
	})
}

// fakeProc builds a /proc-like tree: every pid has a cgroup file and an
// ns/net file; pids that share a netns share the file (a hard link), so
// they share an inode, as nsfs links do.
type fakeProc struct {
	t     *testing.T
	dir   string
	netns map[string]string // netns name -> file
}

func newFakeProc(t *testing.T) *fakeProc {
	p := &fakeProc{t: t, dir: t.TempDir(), netns: map[string]string{}}
	p.add("self", "0::/system.slice/nodemesh-agent.scope\n", "host")
	return p
}

func (p *fakeProc) add(pid, cgroup, netns string) {
	p.t.Helper()
	d := filepath.Join(p.dir, pid)
	if err := os.MkdirAll(filepath.Join(d, "ns"), 0o755); err != nil {
		p.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "cgroup"), []byte(cgroup), 0o644); err != nil {
		p.t.Fatal(err)
	}
	f, ok := p.netns[netns]
	if !ok {
		f = filepath.Join(p.dir, "netns-"+netns)
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			p.t.Fatal(err)
		}
		p.netns[netns] = f
	}
	if err := os.Link(f, filepath.Join(d, "ns", "net")); err != nil {
		p.t.Fatal(err)
	}
}

func TestScannerFake(t *testing.T) {
	const (
		uidB = "11111111-2222-3333-4444-555555555555"
		uidH = "99999999-8888-7777-6666-555555555555"
		uidX = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
	)
	slice := func(uid string) string {
		return "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"
	}
	p := newFakeProc(t)
	p.add("1", "0::/init.scope\n", "host")
	// Pod A on CRI-O: conmon (host netns, lower pid) then pause and app.
	p.add("100", slice(uidA)+"/crio-conmon-"+cid+".scope\n", "host")
	p.add("101", slice(uidA)+"/crio-"+cid+".scope\n", "a")
	p.add("150", slice(uidA)+"/crio-"+cid+".scope\n", "a")
	// Pod B: one process.
	p.add("200", slice(uidB)+"/cri-containerd-"+cid+".scope\n", "b")
	// A hostNetwork pod.
	p.add("300", slice(uidH)+"/cri-containerd-"+cid+".scope\n", "host")
	// A broken pod whose processes disagree.
	p.add("400", slice(uidX)+"/cri-containerd-"+cid+".scope\n", "x1")
	p.add("401", slice(uidX)+"/cri-containerd-"+cid+".scope\n", "x2")
	// Not pods.
	p.add("500", "0::/system.slice/containerd.service\n", "host")
	if err := os.MkdirAll(filepath.Join(p.dir, "sys"), 0o755); err != nil {
		t.Fatal(err)
	}

	s := &Scanner{Proc: p.dir, Hierarchy: Hierarchy{Path: "/sys/fs/cgroup", Root: "/", Layout: LayoutUnified}}
	sb, err := s.Find(uidA)
	if err != nil {
		t.Fatalf("Find(A): %v", err)
	}
	if sb.PID != 101 || sb.Netns != filepath.Join(p.dir, "101", "ns", "net") ||
		sb.Cgroup != "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"+uidA_+".slice" {
		t.Errorf("Find(A) = %+v", sb)
	}
	f, err := s.OpenNetns(sb)
	if err != nil {
		t.Fatalf("OpenNetns(A): %v", err)
	}
	f.Close()
	// The pid now belongs to another pod: OpenNetns must notice.
	if err := os.WriteFile(filepath.Join(p.dir, "101", "cgroup"), []byte(slice(uidB)+"/x.scope\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.OpenNetns(sb); err == nil {
		t.Error("OpenNetns after pid reuse succeeded")
	}
	if err := os.WriteFile(filepath.Join(p.dir, "101", "cgroup"), []byte(slice(uidA)+"/crio-"+cid+".scope\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Find(uidH); !errors.Is(err, ErrHostNetwork) {
		t.Errorf("Find(hostNetwork pod) = %v, want ErrHostNetwork", err)
	}
	if _, err := s.Find(uidX); !errors.Is(err, ErrAmbiguousNetns) {
		t.Errorf("Find(ambiguous pod) = %v, want ErrAmbiguousNetns", err)
	}
	if _, err := s.Find("12345678-1234-1234-1234-123456789012"); !errors.Is(err, ErrPodNotFound) {
		t.Errorf("Find(absent pod) = %v, want ErrPodNotFound", err)
	}
	if _, err := s.Find("../../etc"); err == nil {
		t.Error("Find(not a UID) succeeded")
	}

	all, errs, err := s.Scan()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 || all[uidA].PID != 101 || all[uidB].PID != 200 || len(errs) != 1 {
		t.Errorf("Scan() = %+v, errors %v; want A at pid 101, B at pid 200, one error", all, errs)
	}
	if _, ok := errs[uidX]; !ok {
		t.Errorf("Scan did not report the ambiguous pod: %v", errs)
	}
	if _, ok := all[uidH]; ok {
		t.Error("Scan returned the hostNetwork pod")
	}
	for uid, sb := range all {
		if sb.UID != uid || sb.NetnsInode == 0 || sb.Netns != filepath.Join(p.dir, strconv.Itoa(sb.PID), "ns", "net") {
			t.Errorf("Scan()[%s] = %+v", uid, sb)
		}
	}
}
