package k8s

import (
	"unique"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"
)

// Transform is the informers' cache.TransformFunc: pods become CachedPods
// (CompactPod: only what the agent reads, in the state's form, shared with
// the store), every other object loses its managed fields and the
// last-applied-configuration annotation, which the agent never reads and
// which often outweigh the rest of the object. It is idempotent, as
// client-go requires. It keeps every pod's node-local detail; an agent
// uses TransformFor its node.
func Transform(obj any) (any, error) { return transform(obj, "") }

// TransformFor returns the transform of the agent of node: Transform, with
// pods of other nodes cached without their node-local detail
// (CompactPodFor). node "" is Transform.
func TransformFor(node string) cache.TransformFunc {
	return func(obj any) (any, error) { return transform(obj, node) }
}

func transform(obj any, node string) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return CompactPodFor(o, node), nil
	case *CachedPod:
		return o, nil
	case cache.DeletedFinalStateUnknown:
		return o, nil
	case *unstructured.Unstructured:
		o.SetManagedFields(nil)
		dropLastApplied(o)
		return o, nil
	}
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
		if a := m.GetAnnotations(); a != nil {
			if _, ok := a[corev1.LastAppliedConfigAnnotation]; ok {
				delete(a, corev1.LastAppliedConfigAnnotation)
				m.SetAnnotations(a)
			}
		}
	}
	return obj, nil
}

func dropLastApplied(u *unstructured.Unstructured) {
	if a := u.GetAnnotations(); a != nil {
		if _, ok := a[corev1.LastAppliedConfigAnnotation]; ok {
			delete(a, corev1.LastAppliedConfigAnnotation)
			u.SetAnnotations(a)
		}
	}
}

// intern returns s backed by the one shared copy of its contents.
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// internLabels copies labels with interned keys and values.
func internLabels(labels map[string]string) map[string]string {
	if labels == nil {
		return nil
	}
	out := make(map[string]string, len(labels))
	for k, v := range labels {
		out[intern(k)] = intern(v)
	}
	return out
}
