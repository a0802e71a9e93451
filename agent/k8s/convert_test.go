package k8s

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

func TestConvertEndpointSliceConditions(t *testing.T) {
	tests := []struct {
		name                        string
		cond                        discoveryv1.EndpointConditions
		ready, serving, terminating bool
	}{
		{"all unset", discoveryv1.EndpointConditions{}, true, true, false},
		{"not ready", discoveryv1.EndpointConditions{Ready: ptr.To(false)}, false, false, false},
		{"terminating serving", discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}, false, true, true},
		{"ready explicit", discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true)}, true, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			es := &discoveryv1.EndpointSlice{
				ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: "s", Labels: map[string]string{state.LabelServiceName: "web"}},
				AddressType: discoveryv1.AddressTypeIPv4,
				Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080)}, {Name: ptr.To("all")}},
				Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.1"}, Conditions: tt.cond, NodeName: ptr.To("n1"),
					TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "p"}}},
			}
			c, err := ConvertEndpointSlice(es)
			if err != nil {
				t.Fatal(err)
			}
			e := c.Endpoints[0]
			if e.Ready != tt.ready || e.Serving != tt.serving || e.Terminating != tt.terminating {
				t.Fatalf("ready %t serving %t terminating %t", e.Ready, e.Serving, e.Terminating)
			}
			if c.Service != "web" || len(c.Ports) != 1 || c.Ports[0].Protocol != "TCP" || e.Node != "n1" || *e.Pod != (state.Key{Namespace: "ns", Name: "p"}) {
				t.Fatalf("slice %+v endpoint %+v", c, e)
			}
		})
	}
}

func TestConvertService(t *testing.T) {
	tests := []struct {
		name    string
		spec    corev1.ServiceSpec
		ips     []string
		ports   []state.ServicePort
		wantErr string
	}{
		{"numeric and named targets", corev1.ServiceSpec{ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1", "fd00::1"}, Ports: []corev1.ServicePort{
			{Name: "a", Port: 80, TargetPort: intstr.FromInt32(8080)},
			{Name: "b", Port: 81, TargetPort: intstr.FromString("web"), Protocol: corev1.ProtocolUDP},
			{Name: "c", Port: 82},
		}}, []string{"10.96.0.1", "fd00::1"}, []state.ServicePort{
			{Name: "a", Protocol: "TCP", Port: 80, TargetPort: 8080},
			{Name: "b", Protocol: "UDP", Port: 81, TargetPortName: "web"},
			{Name: "c", Protocol: "TCP", Port: 82, TargetPort: 82},
		}, ""},
		{"headless", corev1.ServiceSpec{ClusterIP: "None", ClusterIPs: []string{"None"}}, nil, nil, ""},
		{"bad ip", corev1.ServiceSpec{ClusterIP: "x"}, nil, nil, "parsing ClusterIP"},
		{"bad port", corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 70000}}}, nil, nil, "out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ConvertService(&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "s"}, Spec: tt.spec})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var ips []string
			for _, a := range c.ClusterIPs {
				ips = append(ips, a.String())
			}
			if !slices.Equal(ips, tt.ips) || !slices.Equal(c.Ports, tt.ports) {
				t.Fatalf("ips %v ports %+v", ips, c.Ports)
			}
		})
	}
}

// fullPod is a pod as a typical API server returns it: managed fields,
// last-applied configuration, env, volumes, resources and container
// statuses. Built by decoding JSON, as the informer does, so no strings are
// shared between pods.
func fullPod(t testing.TB, i int) *corev1.Pod {
	t.Helper()
	js := fmt.Sprintf(`{
 "metadata": {"name": "web-%[1]d", "namespace": "shop", "uid": "0c5b7f8e-2a4e-4b7f-9b8e-%012[1]d", "resourceVersion": "%[1]d",
  "generateName": "web-7d9f8c6b5-", "creationTimestamp": "2026-01-01T00:00:00Z",
  "labels": {"app": "web", "pod-template-hash": "7d9f8c6b5", "version": "v1"},
  "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "%[2]s", "prometheus.io/scrape": "true", "lab.nodemesh.io/netns": "/run/netns/nm-%[1]d"},
  "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5", "uid": "1c5b7f8e-2a4e-4b7f-9b8e-000000000001", "controller": true}],
  "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": %[3]s},
                    {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status", "fieldsType": "FieldsV1", "fieldsV1": %[3]s}]},
 "spec": {"nodeName": "node-%[4]d", "serviceAccountName": "web", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
  "terminationGracePeriodSeconds": 30, "enableServiceLinks": true, "priority": 0,
  "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                  {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
  "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
     {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
     {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
  "containers": [{"name": "app", "image": "registry.example.com/shop/web:1.2.3", "imagePullPolicy": "IfNotPresent",
    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
    "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "DB_HOST", "value": "db.shop.svc.cluster.local"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
    "volumeMounts": [{"name": "kube-api-access-abcde", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
    "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}]},
 "status": {"phase": "Running", "podIP": "10.%[5]d.%[6]d.%[7]d", "podIPs": [{"ip": "10.%[5]d.%[6]d.%[7]d"}], "hostIP": "192.168.0.%[4]d", "qosClass": "Burstable",
  "startTime": "2026-01-01T00:00:01Z",
  "conditions": [{"type": "Initialized", "status": "True", "lastTransitionTime": "2026-01-01T00:00:01Z"}, {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"},
                 {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}, {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
  "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true, "image": "registry.example.com/shop/web:1.2.3",
    "imageID": "registry.example.com/shop/web@sha256:%064[1]d", "containerID": "containerd://%064[1]d", "state": {"running": {"startedAt": "2026-01-01T00:00:02Z"}}}]}
}`, i, strings.Repeat("x", 900), managedFieldsJSON, i%50, (i>>16)&255, (i>>8)&255, i&255)
	var p corev1.Pod
	if err := json.Unmarshal([]byte(js), &p); err != nil {
		t.Fatal(err)
	}
	return &p
}

var managedFieldsJSON = func() string {
	var b strings.Builder
	b.WriteString(`{"f:metadata":{"f:labels":{".":{},"f:app":{},"f:pod-template-hash":{}}},"f:spec":{"f:containers":{`)
	for i := range 8 {
		fmt.Fprintf(&b, `"k:{\"name\":\"c%d\"}":{".":{},"f:image":{},"f:ports":{}},`, i)
	}
	b.WriteString(`"x":{}}}}`)
	return b.String()
}()

func TestCompactPodIsConvertPod(t *testing.T) {
	p := fullPod(t, 1)
	p.DeletionTimestamp = &metav1.Time{}
	full, err := ConvertPod(p)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := Transform(p)
	if err != nil {
		t.Fatal(err)
	}
	c := obj.(*CachedPod)
	if c.Err() != nil || c.ResourceVersion != "1" {
		t.Fatalf("cached pod err %v, resource version %q", c.Err(), c.ResourceVersion)
	}
	a, _ := json.Marshal(full)
	b, _ := json.Marshal(c.Pod)
	if string(a) != string(b) {
		t.Fatalf("the cached form differs from the converted pod:\nconverted %s\ncached    %s", a, b)
	}
	if !c.Pod.Terminating || !slices.Equal(c.Pod.ProbePorts, []uint16{8080}) || len(c.Pod.Ports) != 2 ||
		c.Pod.IPs[0] != netip.MustParseAddr("10.0.0.1") || c.Pod.Annotations()[state.AnnotationNetns] == "" {
		t.Fatalf("converted pod lost fields: %+v", c.Pod)
	}
	// Idempotent, as client-go requires of a transform.
	if again, err := Transform(c); err != nil || again != obj {
		t.Fatalf("transforming a cached pod again: %v, %v", again, err)
	}
	// The cache's key and namespace index read it through meta.Accessor.
	if k, err := cache.MetaNamespaceKeyFunc(c); err != nil || k != "shop/web-1" {
		t.Fatalf("cache key %q, %v", k, err)
	}
	if ns, err := cache.MetaNamespaceIndexFunc(c); err != nil || !slices.Equal(ns, []string{"shop"}) {
		t.Fatalf("namespace index %v, %v", ns, err)
	}
}

// The agent of a node caches the pods of other nodes without what only
// their own node's agent reads, and its own pods whole.
func TestCompactPodForDropsNodeLocalDetailOfRemotePods(t *testing.T) {
	p := fullPod(t, 1) // on node-1
	p.Annotations[state.AnnotationExcludeInboundPorts] = "9100"
	p.Annotations[state.AnnotationCgroup] = "/sys/fs/cgroup/x"
	whole, err := ConvertPod(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"", "node-1"} {
		obj, err := TransformFor(node)(p)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := json.Marshal(whole)
		b, _ := json.Marshal(obj.(*CachedPod).Pod)
		if string(a) != string(b) {
			t.Errorf("transform for node %q changed a pod of its node:\nconverted %s\ncached    %s", node, a, b)
		}
	}
	remote := func(p *corev1.Pod) *state.Pod {
		t.Helper()
		obj, err := TransformFor("node-2")(p)
		if err != nil {
			t.Fatal(err)
		}
		return obj.(*CachedPod).Pod
	}
	got := remote(p)
	want := *whole
	want.SetUID("")
	want.SetAnnotations(map[string]string{state.AnnotationExcludeInboundPorts: "9100"})
	a, _ := json.Marshal(&want)
	b, _ := json.Marshal(got)
	if string(a) != string(b) {
		t.Errorf("remote pod:\ngot  %s\nwant %s", b, a)
	}
	// A pod with only node-local annotations keeps none (no empty map); a
	// pod not yet scheduled is another node's.
	p = fullPod(t, 2)
	p.Spec.NodeName = ""
	if got := remote(p); got.Annotations() != nil || got.UID() != "" || got.Node != "" {
		t.Errorf("unscheduled pod kept node-local detail: %+v", got)
	}
	// A store computes the remote pod's exclusions from what is left.
	st := newStore(t)
	st.Update(func(tx *state.Tx) { tx.SetPod(got) })
	if sp := st.Snapshot().Pod("shop", "web-1"); sp == nil || !slices.Equal(sp.ExcludeInboundPorts(), []uint16{9100}) || sp.Netns() != "" {
		t.Errorf("stored remote pod %+v", sp)
	}
}

// A pod that does not convert is cached with its error, so the store drops
// it instead of keeping its old version.
func TestCompactPodKeepsConversionError(t *testing.T) {
	p := fullPod(t, 1)
	p.Status.PodIP = "not-an-ip"
	c := CompactPod(p)
	if c.Err() == nil || !strings.Contains(c.Err().Error(), "not-an-ip") || c.Pod.Key() != (state.Key{Namespace: "shop", Name: "web-1"}) {
		t.Fatalf("cached pod %+v, err %v", c.Pod, c.Err())
	}
	st := newStore(t)
	st.Update(func(tx *state.Tx) { tx.SetPod(&state.Pod{Namespace: "shop", Name: "web-1"}) })
	var err error
	st.Update(func(tx *state.Tx) {
		if err = setCachedPod(tx, c); err != nil {
			deleteCachedPod(tx, c)
		}
	})
	if err == nil || st.Snapshot().Pod("shop", "web-1") != nil {
		t.Fatalf("a pod that does not convert stayed in the store (err %v)", err)
	}
}

// Pods decoded separately share one copy of the strings they repeat once
// compacted (label keys and values, namespace, node, service account,
// workload, port names), and pods with equal labels share one label map.
func TestCompactPodInternsRepeatedValues(t *testing.T) {
	a, b := CompactPod(fullPod(t, 50)), CompactPod(fullPod(t, 100)) // same node: i%50
	same := func(what, x, y string) {
		t.Helper()
		if x != y || unsafe.StringData(x) != unsafe.StringData(y) {
			t.Errorf("%s: %q and %q are separate copies", what, x, y)
		}
	}
	same("namespace", a.Pod.Namespace, b.Pod.Namespace)
	same("node", a.Pod.Node, b.Pod.Node)
	same("service account", a.Pod.ServiceAccount, b.Pod.ServiceAccount)
	same("workload", a.Pod.Workload, b.Pod.Workload)
	same("port name", a.Pod.Ports[0].Name, b.Pod.Ports[0].Name)
	same("label value", a.Pod.Labels["app"], b.Pod.Labels["app"])
	if reflect.ValueOf(a.Pod.Labels).UnsafePointer() != reflect.ValueOf(b.Pod.Labels).UnsafePointer() {
		t.Error("pods with equal labels hold separate label maps")
	}
	if unsafe.SliceData(a.Pod.Ports) != unsafe.SliceData(b.Pod.Ports) {
		t.Error("pods with equal ports hold separate port lists")
	}
	same("phase", string(a.Pod.Phase), string(b.Pod.Phase))
	for k := range a.Pod.Labels {
		for k2 := range b.Pod.Labels {
			if k == k2 {
				same("label key", k, k2)
			}
		}
	}
	other := fullPod(t, 51)
	other.Labels["version"] = "v2"
	if c := CompactPod(other); reflect.ValueOf(c.Pod.Labels).UnsafePointer() == reflect.ValueOf(a.Pod.Labels).UnsafePointer() ||
		c.Pod.Labels["version"] != "v2" || a.Pod.Labels["version"] != "v1" {
		t.Errorf("different labels share a map: %v and %v", c.Pod.Labels, a.Pod.Labels)
	}
	if CompactPod(&corev1.Pod{}).Pod.Labels != nil {
		t.Error("a pod without labels got a label map")
	}
}

// Interned label sets are freed once no cached pod holds them, so label
// churn cannot grow the table.
func TestLabelSetsAreFreed(t *testing.T) {
	var held []*CachedPod
	var keys []string
	for i := range 100 {
		p := fullPod(t, i)
		p.Labels = map[string]string{"churn": fmt.Sprint(i)}
		held = append(held, CompactPod(p))
		keys = append(keys, labelKey(p.Labels))
	}
	live := func() int {
		labelSets.Lock()
		defer labelSets.Unlock()
		n := 0
		for _, k := range keys {
			if _, ok := labelSets.m[k]; ok {
				n++
			}
		}
		return n
	}
	if got := live(); got != 100 {
		t.Fatalf("%d of 100 label sets interned", got)
	}
	runtime.KeepAlive(held)
	held = nil
	waitfor.True(t, 10*time.Second, "interned label sets freed", func() bool {
		runtime.GC()
		return live() == 0
	})
}

func TestLabelKeyIsUnambiguous(t *testing.T) {
	sets := []map[string]string{
		{"a": "b=c"}, {"a=b": "c"}, {"a": "b", "c": "d"}, {"a": "bc:d"}, {"ab": "c"}, {"a": ""}, {"": "a"},
	}
	seen := map[string]int{}
	for i, m := range sets {
		k := labelKey(m)
		if j, dup := seen[k]; dup {
			t.Fatalf("label sets %v and %v share the key %q", sets[j], m, k)
		}
		seen[k] = i
	}
}

func TestTransformOtherObjects(t *testing.T) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "s",
		Annotations:   map[string]string{corev1.LastAppliedConfigAnnotation: "{}", "keep": "1"},
		ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "x"}}}}
	out, err := Transform(svc)
	if err != nil {
		t.Fatal(err)
	}
	got := out.(*corev1.Service)
	if len(got.ManagedFields) != 0 || len(got.Annotations) != 1 || got.Annotations["keep"] != "1" {
		t.Fatalf("transformed service %+v", got.ObjectMeta)
	}
}

// TestMemoryPerPod measures what the informer cache plus the store hold per
// pod, with full objects and with the transform, and reports the figures.
// It fails only if the transform does not save at least three quarters.
func TestMemoryPerPod(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates a few tens of MB")
	}
	const n = 2000
	full := func() (cacheBytes, storeBytes uint64) {
		st := newStore(t)
		idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
		start := heap()
		for i := range n {
			if err := idx.Add(fullPod(t, i)); err != nil {
				t.Fatal(err)
			}
		}
		cached := heap()
		for _, obj := range idx.List() {
			c, err := ConvertPod(obj.(*corev1.Pod))
			if err != nil {
				t.Fatal(err)
			}
			st.Update(func(tx *state.Tx) { tx.SetPod(c) })
		}
		stored := heap()
		runtime.KeepAlive(idx)
		runtime.KeepAlive(st)
		return delta(start, cached) / n, delta(cached, stored) / n
	}
	compact := func() uint64 {
		st := newStore(t)
		idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
		start := heap()
		for i := range n {
			obj, err := Transform(fullPod(t, i))
			if err != nil {
				t.Fatal(err)
			}
			if err := idx.Add(obj); err != nil {
				t.Fatal(err)
			}
			applyPodForTest(t, st, obj)
		}
		end := heap()
		runtime.KeepAlive(idx)
		runtime.KeepAlive(st)
		return delta(start, end) / n
	}
	fullCache, fullStore := full()
	both := compact()
	t.Logf("memory per pod (%d pods): informer cache %d B + store %d B with full objects; %d B for both with the transform (%.1fx less)",
		n, fullCache, fullStore, both, float64(fullCache+fullStore)/float64(max(both, 1)))
	if both == 0 || both*4 > fullCache+fullStore {
		t.Fatalf("the transform saved too little: full %d B/pod, compact %d B/pod", fullCache+fullStore, both)
	}
}

func delta(a, b uint64) uint64 {
	if b < a {
		return 0
	}
	return b - a
}

func heap() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func TestWorkloadName(t *testing.T) {
	ctrl := func(kind, name string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{Kind: kind, Name: name, Controller: ptr.To(true)}}
	}
	tests := []struct {
		name   string
		owners []metav1.OwnerReference
		labels map[string]string
		want   string
	}{
		{"deployment", ctrl("ReplicaSet", "web-7d9f8c6b5"), map[string]string{"pod-template-hash": "7d9f8c6b5"}, "web"},
		{"bare replicaset", ctrl("ReplicaSet", "web-abc"), nil, "web-abc"},
		{"statefulset", ctrl("StatefulSet", "db"), nil, "db"},
		{"daemonset", ctrl("DaemonSet", "agent"), nil, "agent"},
		{"cronjob's job", ctrl("Job", "backup-29000000"), nil, "backup"},
		{"job", ctrl("Job", "migrate"), nil, "migrate"},
		{"no controller", []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "x"}}, nil, "pod-0"},
		{"bare pod", nil, nil, "pod-0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "pod-0", OwnerReferences: tt.owners, Labels: tt.labels}}
			c, err := ConvertPod(p)
			if err != nil {
				t.Fatal(err)
			}
			if got, cached := c.WorkloadName(), CompactPod(p).Pod.WorkloadName(); got != tt.want || cached != tt.want {
				t.Fatalf("workload %q (cached %q), want %q", got, cached, tt.want)
			}
		})
	}
}

// TestConvertPodSidecars: a sidecar's (restartPolicy: Always init
// container's) ports and probe ports count as the pod's, after the
// containers'; an ordinary init container's do not. The cached form keeps them.
func TestConvertPodSidecars(t *testing.T) {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "b", Namespace: "y", UID: "u-b"},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{
				{Name: "seed", Ports: []corev1.ContainerPort{{Name: "seed", ContainerPort: 7070}},
					ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(7071)}}}},
				{Name: "warm", RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways),
					Ports:          []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9090}, {Name: "admin", ContainerPort: 9901}},
					ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("admin")}}}},
			},
			Containers: []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}},
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.7.0.2"},
	}
	want := []state.ContainerPort{{Name: "http", Port: 8080, Protocol: "TCP"}, {Name: "metrics", Port: 9090, Protocol: "TCP"}, {Name: "admin", Port: 9901, Protocol: "TCP"}}
	got, err := ConvertPod(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, pod := range []*state.Pod{got, CompactPod(p).Pod} {
		if !slices.Equal(pod.Ports, want) || !slices.Equal(pod.ProbePorts, []uint16{9901}) {
			t.Errorf("ports %+v, probe ports %v; want %+v, [9901]", pod.Ports, pod.ProbePorts, want)
		}
	}
}

// The informer caches one CachedPod per pod in the cluster.
func TestCachedPodSize(t *testing.T) {
	if n := unsafe.Sizeof(CachedPod{}); n > 32 {
		t.Fatalf("CachedPod is %d bytes, more than the 32 of its size class", n)
	}
}
