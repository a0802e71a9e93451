package state

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
	"unsafe"
)

// The agent keeps a Pod for every pod in the cluster: its size class is
// most of what a remote pod costs (docs/scale.md).
func TestPodSize(t *testing.T) {
	if n := unsafe.Sizeof(Pod{}); n > 240 {
		t.Fatalf("Pod is %d bytes, more than the 240 of its size class", n)
	}
}

// Setting a copy's detail leaves the original's alone: copies share the
// detail until one of them sets its own.
func TestPodDetailIsCopiedOnWrite(t *testing.T) {
	p := WithDetail(Pod{Namespace: "ns", Name: "a"}, PodDetail{UID: "u1", Netns: "/run/netns/a"})
	q := *p
	q.SetUID("")
	q.SetLocation("/proc/1/ns/net", "/sys/fs/cgroup/a")
	r := *p
	r.SetAnnotations(map[string]string{AnnotationExcludeInboundPorts: "80"})
	if p.UID() != "u1" || p.Netns() != "/run/netns/a" || p.Cgroup() != "" || p.Annotations() != nil {
		t.Errorf("the original changed: %+v", p.Detail())
	}
	if q.UID() != "" || q.Netns() != "/proc/1/ns/net" || q.Cgroup() != "/sys/fs/cgroup/a" {
		t.Errorf("copy: %+v", q.Detail())
	}
	if r.UID() != "u1" || r.Annotations()[AnnotationExcludeInboundPorts] != "80" {
		t.Errorf("second copy: %+v", r.Detail())
	}
	// A pod without detail holds none.
	var bare Pod
	bare.SetDetail(PodDetail{UID: "x"})
	bare.SetUID("")
	if bare.detail != nil {
		t.Errorf("an empty detail is kept: %+v", *bare.detail)
	}
}

// A pod encodes as before its detail moved behind a pointer: the detail's
// fields beside the pod's, uid always present.
func TestPodJSON(t *testing.T) {
	p := WithDetail(Pod{Namespace: "ns", Name: "a", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Phase: PodRunning, Enrolled: true},
		PodDetail{UID: "u1", Annotations: map[string]string{AnnotationNetns: "/run/netns/a"}, Netns: "/run/netns/a", ExcludeInboundPorts: []uint16{9100}, Problems: []string{"p"}})
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"namespace", "name", "uid", "annotations", "ips", "phase", "enrolled", "excludeInboundPorts", "netns", "problems"} {
		if _, ok := m[k]; !ok {
			t.Errorf("no %q in %s", k, b)
		}
	}
	var back Pod
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&back, p) {
		t.Errorf("round trip:\ngot  %+v %+v\nwant %+v %+v", back, back.Detail(), *p, p.Detail())
	}
	b, err = json.Marshal(&Pod{Name: "bare"})
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &m); err != nil || m["uid"] != "" {
		t.Errorf("a pod without detail encodes as %s, want \"uid\": \"\"", b)
	}
}
