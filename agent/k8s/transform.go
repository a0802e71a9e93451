package k8s

import (
	"unique"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"
)

// Transform is the informers' cache.TransformFunc: pods are cut down by
// StripPod, every other object loses its managed fields and the
// last-applied-configuration annotation, which the agent never reads and
// which often outweigh the rest of the object.
func Transform(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return StripPod(o), nil
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

// StripPod returns a pod with only what ConvertPod reads: identity
// metadata (name, namespace, UID, resource version, labels, the
// annotations state.KeepAnnotation accepts, deletion timestamp), node,
// service account, host networking, container ports and probe ports, phase
// and IPs. The informer calls it before caching, so the full object is
// garbage as soon as the event is handled.
//
// The strings many pods repeat - label keys and values, namespace, node,
// service account, owner - are interned (package unique), so the pods of
// a large cluster share one copy of each; an interned string is freed when
// no pod uses it any more, so churn cannot grow the table.
func StripPod(p *corev1.Pod) *corev1.Pod {
	out := &corev1.Pod{
		TypeMeta: p.TypeMeta,
		Spec: corev1.PodSpec{
			NodeName:           intern(p.Spec.NodeName),
			ServiceAccountName: intern(p.Spec.ServiceAccountName),
			HostNetwork:        p.Spec.HostNetwork,
		},
		Status: corev1.PodStatus{
			Phase:  p.Status.Phase,
			PodIP:  p.Status.PodIP,
			PodIPs: p.Status.PodIPs,
		},
	}
	out.Name = p.Name
	out.Namespace = intern(p.Namespace)
	out.UID = p.UID
	out.ResourceVersion = p.ResourceVersion
	out.Labels = internLabels(p.Labels)
	out.Annotations = keepAnnotations(p.Annotations)
	out.DeletionTimestamp = p.DeletionTimestamp
	for _, o := range p.OwnerReferences {
		if o.Controller != nil && *o.Controller {
			out.OwnerReferences = []metav1.OwnerReference{{Kind: intern(o.Kind), Name: intern(o.Name), Controller: o.Controller}}
			break
		}
	}
	out.Spec.Containers = stripContainers(p.Spec.Containers, false)
	out.Spec.InitContainers = stripContainers(p.Spec.InitContainers, true)
	return out
}

// stripContainers keeps of each container what ConvertPod reads: name,
// ports and probes; of init containers only the sidecars
// (servingContainers), with their restart policy. A container with neither
// ports nor probes is dropped.
func stripContainers(cs []corev1.Container, sidecarsOnly bool) []corev1.Container {
	var out []corev1.Container
	for _, c := range cs {
		if sidecarsOnly && !isSidecar(c) {
			continue
		}
		if len(c.Ports) == 0 && c.LivenessProbe == nil && c.ReadinessProbe == nil && c.StartupProbe == nil {
			continue
		}
		sc := corev1.Container{
			Name:           c.Name,
			RestartPolicy:  c.RestartPolicy,
			LivenessProbe:  stripProbe(c.LivenessProbe),
			ReadinessProbe: stripProbe(c.ReadinessProbe),
			StartupProbe:   stripProbe(c.StartupProbe),
		}
		for _, cp := range c.Ports {
			sc.Ports = append(sc.Ports, corev1.ContainerPort{Name: cp.Name, ContainerPort: cp.ContainerPort, Protocol: cp.Protocol})
		}
		out = append(out, sc)
	}
	return out
}

func stripProbe(pr *corev1.Probe) *corev1.Probe {
	if pr == nil {
		return nil
	}
	out := &corev1.Probe{}
	switch {
	case pr.HTTPGet != nil:
		out.HTTPGet = &corev1.HTTPGetAction{Port: pr.HTTPGet.Port}
	case pr.TCPSocket != nil:
		out.TCPSocket = &corev1.TCPSocketAction{Port: pr.TCPSocket.Port}
	case pr.GRPC != nil:
		out.GRPC = &corev1.GRPCAction{Port: pr.GRPC.Port}
	default:
		return nil
	}
	return out
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
