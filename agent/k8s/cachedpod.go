package k8s

import (
	"runtime"
	"slices"
	"strconv"
	"sync"
	"weak"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"

	interned "github.com/nodemesh/nodemesh/agent/internal/intern"
	"github.com/nodemesh/nodemesh/agent/state"
)

// CachedPod is the pods informer's cached form of a pod: the state's Pod,
// converted once by the informer's transform, which the store then holds
// by pointer, so the informer cache and the store share one copy. The
// informer stays the source of truth: the store is fed from its events,
// and a relist replaces what it caches.
//
// Its contents are never modified once built, so DeepCopyObject may share
// them.
type CachedPod struct {
	// Pod is the converted pod; on a conversion error it holds only the
	// namespace and name.
	Pod *state.Pod
	// ResourceVersion is the pod's, kept for the cache's bookkeeping.
	ResourceVersion string
	// held keeps the pod's interned label set alive while it is cached;
	// a pod that did not convert has none, and held carries its error
	// instead. One field for both keeps a cached pod in the 32-byte size
	// class (TestCachedPodSize).
	held *labelSet
}

// Err returns ConvertPod's error: the store drops such a pod (its old
// version would be wrong) and the agent logs it.
func (c *CachedPod) Err() error {
	if c.held == nil {
		return nil
	}
	return c.held.err
}

var (
	_ k8sruntime.Object         = (*CachedPod)(nil)
	_ metav1.ObjectMetaAccessor = (*CachedPod)(nil)
)

// GetObjectKind implements runtime.Object; a cached pod carries no type
// metadata.
func (c *CachedPod) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject implements runtime.Object. The contents are immutable, so
// the copy shares them.
func (c *CachedPod) DeepCopyObject() k8sruntime.Object {
	cp := *c
	return &cp
}

// GetObjectMeta implements metav1.ObjectMetaAccessor, which the cache's key
// function and the informer's update handling (resource versions) read
// through meta.Accessor. It leaves out the UID, which nothing reads there
// (a remote pod has none anyway): the pod's UID sits in its detail, which
// the store fills in place while the informer may be reading this
// (state.Pod.computed).
func (c *CachedPod) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: c.Pod.Namespace, Name: c.Pod.Name, ResourceVersion: c.ResourceVersion}
}

// CompactPod converts an API pod to its cached form (ConvertPod), with the
// strings many pods repeat interned (package unique: namespace, node,
// service account, workload, phase, port names and protocols) and the
// label map and the port list themselves interned: the pods of one
// workload share one map and one list. Interned values are freed when no
// pod uses them any more, so churn cannot grow a table.
// It keeps every pod's node-local detail; see CompactPodFor.
func CompactPod(p *corev1.Pod) *CachedPod { return CompactPodFor(p, "") }

// CompactPodFor is CompactPod for the agent of node: a pod scheduled on
// another node (or on none yet) is cached without what only its own
// node's agent reads (state.Pod's node-local fields: its UID and the lab's
// netns and cgroup annotations, see state.NodeLocalAnnotation), which is
// most of what a remote pod would cost beyond its identity, labels,
// addresses and ports. A pod's node never changes once it is bound, and
// binding arrives as an update that is compacted again from the full
// object, so the agent's own pods always keep theirs. node "" keeps every
// pod's detail.
func CompactPodFor(p *corev1.Pod, node string) *CachedPod {
	out := &CachedPod{ResourceVersion: p.ResourceVersion}
	c, err := ConvertPod(p)
	if err != nil {
		out.Pod = &state.Pod{Namespace: intern(p.Namespace), Name: p.Name}
		out.Pod.SetUID(string(p.UID))
		out.held = &labelSet{err: err}
		return out
	}
	if node != "" && c.Node != node {
		stripNodeLocal(c)
	}
	c.Namespace = intern(c.Namespace)
	c.Node = intern(c.Node)
	c.ServiceAccount = intern(c.ServiceAccount)
	c.Workload = intern(c.Workload)
	c.Phase = state.PodPhase(intern(string(c.Phase)))
	for i := range c.Ports {
		c.Ports[i].Name = intern(c.Ports[i].Name)
		c.Ports[i].Protocol = intern(c.Ports[i].Protocol)
	}
	c.Ports = portLists.Make(c.Ports)
	c.IPs = slices.Clip(c.IPs)
	c.ProbePorts = probeLists.Make(c.ProbePorts)
	out.held = internLabelSet(c.Labels)
	c.Labels = nil
	if out.held != nil {
		c.Labels = out.held.m
	}
	out.Pod = c
	return out
}

// stripNodeLocal drops from a pod of another node what only its own
// node's agent reads.
func stripNodeLocal(c *state.Pod) {
	d := c.Detail()
	d.UID = ""
	for k := range d.Annotations { // ConvertPod's own map: nothing shares it yet
		if state.NodeLocalAnnotation(k) {
			delete(d.Annotations, k)
		}
	}
	if len(d.Annotations) == 0 {
		d.Annotations = nil
	}
	c.SetDetail(d)
}

// portLists interns pods' port lists: the pods of one workload declare
// the same ports.
var portLists = interned.NewPorts(func(p state.ContainerPort) (string, int64, string) {
	return p.Name, int64(p.Port), p.Protocol
})

// probeLists interns pods' probe port lists, which the pods of one
// workload share too.
var probeLists interned.Ints[uint16]

// labelSet is one interned label map. Pods hold the map; their CachedPod
// holds the set, which keeps the table entry alive. (For a pod that did
// not convert, CachedPod.held is a labelSet of its error alone, never
// interned.)
type labelSet struct {
	m   map[string]string
	err error
}

// labelSets interns label maps by their contents, like package unique does
// for strings: an entry lives while a cached pod holds it and is removed by
// a cleanup once the set is garbage. It is process-wide because interning
// pays most when everything that reads pods shares one copy.
var labelSets = struct {
	sync.Mutex
	m map[string]weak.Pointer[labelSet]
}{m: make(map[string]weak.Pointer[labelSet])}

// internLabelSet returns the shared set equal to labels (nil for none).
func internLabelSet(labels map[string]string) *labelSet {
	if len(labels) == 0 {
		return nil
	}
	key := labelKey(labels)
	labelSets.Lock()
	defer labelSets.Unlock()
	if wp, ok := labelSets.m[key]; ok {
		if ls := wp.Value(); ls != nil {
			return ls
		}
	}
	ls := &labelSet{m: internLabels(labels)}
	labelSets.m[key] = weak.Make(ls)
	runtime.AddCleanup(ls, func(key string) {
		labelSets.Lock()
		defer labelSets.Unlock()
		if wp, ok := labelSets.m[key]; ok && wp.Value() == nil {
			delete(labelSets.m, key)
		}
	}, key)
	return ls
}

// labelKey is an unambiguous encoding of a label map: its keys sorted,
// each key and value preceded by its length, so two maps have the same key
// exactly when they are equal.
func labelKey(labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	n := 0
	for k, v := range labels {
		keys = append(keys, k)
		n += len(k) + len(v) + 8
	}
	slices.Sort(keys)
	b := make([]byte, 0, n)
	for _, k := range keys {
		b = strconv.AppendInt(b, int64(len(k)), 10)
		b = append(b, ':')
		b = append(b, k...)
		v := labels[k]
		b = strconv.AppendInt(b, int64(len(v)), 10)
		b = append(b, ':')
		b = append(b, v...)
	}
	return string(b)
}
