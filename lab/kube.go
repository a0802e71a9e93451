package lab

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/spec"
)

// Annotations the lab writes on every Pod so that a node agent in the lab
// can find the pod's kernel objects.
const (
	AnnotationNetns  = "lab.nodemesh.io/netns"
	AnnotationCgroup = "lab.nodemesh.io/cgroup"
)

// ManagedBy is the endpointslice.kubernetes.io/managed-by value of the
// EndpointSlices the lab writes.
const ManagedBy = "lab.nodemesh.io"

// WorkloadImage is the image name written into Pod specs; nothing pulls it.
const WorkloadImage = "lab.nodemesh.io/workload:latest"

func (l *Lab) ensureNamespace(ctx context.Context, name string, labels map[string]string) error {
	c := l.Server.Client.CoreV1().Namespaces()
	ns, err := c.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("creating namespace %s: %w", name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading namespace %s: %w", name, err)
	}
	want := map[string]string{corev1.LabelMetadataName: name}
	for k, v := range labels {
		want[k] = v
	}
	if mapsEqual(ns.Labels, want) {
		return nil
	}
	ns.Labels = want
	if _, err := c.Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating the labels of namespace %s: %w", name, err)
	}
	return nil
}

func (l *Lab) ensureServiceAccount(ctx context.Context, ns, name string) error {
	c := l.Server.Client.CoreV1().ServiceAccounts(ns)
	_, err := c.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating service account %s/%s: %w", ns, name, err)
	}
	return nil
}

func (l *Lab) createNode(ctx context.Context, n *Node, sn *spec.Node) error {
	labels := map[string]string{
		corev1.LabelHostname:   n.Name,
		corev1.LabelOSStable:   "linux",
		"lab.nodemesh.io/node": "true",
	}
	for k, v := range sn.Labels {
		labels[k] = v
	}
	obj := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: labels, Annotations: map[string]string{
			AnnotationNetns:  n.Netns,
			AnnotationCgroup: n.Cgroup,
		}},
		Spec: corev1.NodeSpec{PodCIDR: n.PodCIDR, PodCIDRs: []string{n.PodCIDR}},
	}
	c := l.Server.Client.CoreV1().Nodes()
	created, err := c.Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating node %s: %w", n.Name, err)
	}
	now := metav1.Now()
	created.Status = corev1.NodeStatus{
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.IP},
			{Type: corev1.NodeHostName, Address: n.Name},
		},
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "LabNodeReady",
			Message: "the lab node's network namespace is up", LastHeartbeatTime: now, LastTransitionTime: now,
		}},
		Phase:    corev1.NodeRunning,
		NodeInfo: corev1.NodeSystemInfo{OperatingSystem: "linux", Architecture: "amd64", KubeletVersion: "nodemesh-lab"},
		// The API proxy stands in for the kubelet's API (kubelet.go).
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: apiserver.KubeletPort}},
	}
	if _, err := c.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("setting the status of node %s: %w", n.Name, err)
	}
	return nil
}

func podAnnotations(p *Pod, sp *spec.Pod) map[string]string {
	a := map[string]string{AnnotationNetns: p.Netns, AnnotationCgroup: p.Cgroup}
	for k, v := range sp.Annotations {
		a[k] = v
	}
	return a
}

// readinessProbe is a TCP probe of port (a name or number; "" for none).
func readinessProbe(port string) *corev1.Probe {
	if port == "" {
		return nil
	}
	return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.Parse(port)}}}
}

// createPod publishes a started pod as kubelet would: the Pod object, then
// its status (Running, IPs, Ready).
func (l *Lab) createPod(ctx context.Context, p *Pod, sp *spec.Pod, n *Node, started time.Time) error {
	var ports []corev1.ContainerPort
	for _, cp := range sp.Ports {
		ports = append(ports, corev1.ContainerPort{Name: cp.Name, ContainerPort: cp.ContainerPort, Protocol: corev1.Protocol(cp.Protocol)})
	}
	zero := int64(0)
	obj := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: sp.Labels, Annotations: podAnnotations(p, sp)},
		Spec: corev1.PodSpec{
			NodeName:                      n.Name,
			ServiceAccountName:            sp.ServiceAccount,
			TerminationGracePeriodSeconds: &zero,
			Containers: []corev1.Container{{
				Name: "main", Image: WorkloadImage, Command: sp.Command, Ports: ports,
				ImagePullPolicy: corev1.PullNever, ReadinessProbe: readinessProbe(sp.ProbePort),
			}},
		},
	}
	c := l.Server.Client.CoreV1().Pods(p.Namespace)
	created, err := c.Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating pod %s: %w", p.Key(), err)
	}
	p.UID = string(created.UID)
	st := metav1.NewTime(started)
	cond := func(t corev1.PodConditionType) corev1.PodCondition {
		return corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: st}
	}
	podIPs := []corev1.PodIP{{IP: p.IP}}
	if p.IP6 != "" {
		podIPs = append(podIPs, corev1.PodIP{IP: p.IP6})
	}
	created.Status = corev1.PodStatus{
		Phase:     corev1.PodRunning,
		HostIP:    n.IP,
		HostIPs:   []corev1.HostIP{{IP: n.IP}},
		PodIP:     p.IP,
		PodIPs:    podIPs,
		StartTime: &st,
		QOSClass:  corev1.PodQOSBestEffort,
		Conditions: []corev1.PodCondition{
			cond(corev1.PodScheduled), cond(corev1.PodInitialized),
			cond(corev1.ContainersReady), cond(corev1.PodReady),
		},
		ContainerStatuses: []corev1.ContainerStatus{{
			Name: "main", Ready: true, Started: ptr(true), Image: WorkloadImage, ImageID: WorkloadImage,
			ContainerID: "lab://" + strconv.Itoa(p.Pid),
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: st}},
		}},
	}
	if _, err := c.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("setting the status of pod %s: %w", p.Key(), err)
	}
	return nil
}

// updatePodMeta brings a pod's labels and annotations in line with the spec
// without restarting it.
func (l *Lab) updatePodMeta(ctx context.Context, p *Pod, sp *spec.Pod) error {
	c := l.Server.Client.CoreV1().Pods(p.Namespace)
	obj, err := c.Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading pod %s: %w", p.Key(), err)
	}
	obj.Labels = sp.Labels
	obj.Annotations = podAnnotations(p, sp)
	if _, err := c.Update(ctx, obj, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating pod %s: %w", p.Key(), err)
	}
	return nil
}

func (l *Lab) deletePod(ctx context.Context, p *Pod) error {
	zero := int64(0)
	err := l.Server.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting pod %s: %w", p.Key(), err)
	}
	return nil
}

func servicePorts(ss *spec.Service) []corev1.ServicePort {
	var out []corev1.ServicePort
	for _, sp := range ss.Ports {
		out = append(out, corev1.ServicePort{Name: sp.Name, Port: sp.Port, TargetPort: sp.TargetPort, Protocol: corev1.Protocol(sp.Protocol)})
	}
	return out
}

// ensureService creates or updates a ClusterIP Service and returns the
// ClusterIP the API server allocated.
func (l *Lab) ensureService(ctx context.Context, ss *spec.Service) (string, error) {
	c := l.Server.Client.CoreV1().Services(ss.Namespace)
	cur, err := c.Get(ctx, ss.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		obj := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: ss.Name, Namespace: ss.Namespace, Labels: ss.Labels},
			Spec: corev1.ServiceSpec{
				Type: corev1.ServiceTypeClusterIP, Selector: ss.Selector, Ports: servicePorts(ss),
			},
		}
		created, err := c.Create(ctx, obj, metav1.CreateOptions{})
		if err != nil {
			return "", fmt.Errorf("creating service %s: %w", ss.Key(), err)
		}
		return created.Spec.ClusterIP, nil
	}
	if err != nil {
		return "", fmt.Errorf("reading service %s: %w", ss.Key(), err)
	}
	cur.Labels = ss.Labels
	cur.Spec.Selector = ss.Selector
	cur.Spec.Ports = servicePorts(ss)
	upd, err := c.Update(ctx, cur, metav1.UpdateOptions{})
	if err != nil {
		return "", fmt.Errorf("updating service %s: %w", ss.Key(), err)
	}
	return upd.Spec.ClusterIP, nil
}

func (l *Lab) deleteService(ctx context.Context, ns, name string) error {
	err := l.Server.Client.CoreV1().Services(ns).Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting service %s/%s: %w", ns, name, err)
	}
	return l.syncSlices(ctx, &spec.Service{Namespace: ns, Name: name}, nil)
}

// endpoint is one pod behind one resolved service port set.
type endpoint struct {
	pod   *Pod
	ports []discoveryv1.EndpointPort
	key   string // the resolved port numbers, grouping slices
}

// endpointsOf resolves which lab pods back a service and on which ports,
// as the EndpointSlice controller would: only pods the selector matches
// and, per port, only pods that declare a named targetPort.
func (l *Lab) endpointsOf(ss *spec.Service) []endpoint {
	var out []endpoint
	for _, sp := range l.st.Spec.Pods {
		if !ss.Selects(&sp) {
			continue
		}
		p, ok := l.st.Pods[sp.Key()]
		if !ok {
			continue
		}
		var ports []discoveryv1.EndpointPort
		var key []string
		for i := range ss.Ports {
			svp := &ss.Ports[i]
			n, ok := svp.ResolvePort(&sp)
			if !ok {
				continue
			}
			proto := corev1.Protocol(svp.Protocol)
			ports = append(ports, discoveryv1.EndpointPort{Name: ptr(svp.Name), Port: ptr(n), Protocol: &proto})
			key = append(key, fmt.Sprintf("%s=%d/%s", svp.Name, n, svp.Protocol))
		}
		if len(ports) == 0 {
			continue
		}
		out = append(out, endpoint{pod: p, ports: ports, key: strings.Join(key, ",")})
	}
	return out
}

// syncSlices makes the service's EndpointSlices (one per distinct set of
// resolved ports) match eps; nil eps removes them all.
func (l *Lab) syncSlices(ctx context.Context, ss *spec.Service, eps []endpoint) error {
	c := l.Server.Client.DiscoveryV1().EndpointSlices(ss.Namespace)
	groups := map[string][]endpoint{}
	for _, e := range eps {
		groups[e.key] = append(groups[e.key], e)
	}
	want := map[string]*discoveryv1.EndpointSlice{}
	var svcUID string
	if len(groups) > 0 {
		svc, err := l.Server.Client.CoreV1().Services(ss.Namespace).Get(ctx, ss.Name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reading service %s: %w", ss.Key(), err)
		}
		svcUID = string(svc.UID)
	}
	for key, group := range groups {
		sum := sha256.Sum256([]byte(key))
		name := ss.Name + "-" + hex.EncodeToString(sum[:])[:5]
		sort.Slice(group, func(i, j int) bool { return group[i].pod.Key() < group[j].pod.Key() })
		sl := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{
				Name: name, Namespace: ss.Namespace,
				Labels: map[string]string{
					discoveryv1.LabelServiceName: ss.Name,
					discoveryv1.LabelManagedBy:   ManagedBy,
				},
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Service", Name: ss.Name, UID: types.UID(svcUID),
					Controller: ptr(true), BlockOwnerDeletion: ptr(true),
				}},
			},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       group[0].ports,
		}
		for _, e := range group {
			sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
				Addresses:  []string{e.pod.IP},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)},
				NodeName:   ptr(e.pod.Node),
				TargetRef: &corev1.ObjectReference{
					Kind: "Pod", Namespace: e.pod.Namespace, Name: e.pod.Name, UID: types.UID(e.pod.UID),
				},
			})
		}
		want[name] = sl
	}
	have, err := c.List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + ss.Name + "," + discoveryv1.LabelManagedBy + "=" + ManagedBy})
	if err != nil {
		return fmt.Errorf("listing endpoint slices of %s: %w", ss.Key(), err)
	}
	for i := range have.Items {
		cur := &have.Items[i]
		w, ok := want[cur.Name]
		if !ok {
			if err := c.Delete(ctx, cur.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("deleting endpoint slice %s/%s: %w", ss.Namespace, cur.Name, err)
			}
			continue
		}
		w.ResourceVersion = cur.ResourceVersion
		if _, err := c.Update(ctx, w, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("updating endpoint slice %s/%s: %w", ss.Namespace, w.Name, err)
		}
		delete(want, cur.Name)
	}
	for _, w := range want {
		if _, err := c.Create(ctx, w, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating endpoint slice %s/%s: %w", ss.Namespace, w.Name, err)
		}
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

// deleteNamespace removes a namespace the way the namespace controller
// would: its remaining content (the service accounts the lab made), then
// the namespace, then its "kubernetes" finalizer, which only that
// controller removes and this cluster does not run. Without that last step
// the namespace would stay Terminating and could never be used again.
func (l *Lab) deleteNamespace(ctx context.Context, name string) error {
	cs := l.Server.Client
	zero := int64(0)
	if err := cs.CoreV1().Pods(name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting the pods of namespace %s: %w", name, err)
	}
	if err := cs.CoreV1().ServiceAccounts(name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting the service accounts of namespace %s: %w", name, err)
	}
	err := cs.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("deleting namespace %s: %w", name, err)
	}
	ns, err := cs.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading namespace %s: %w", name, err)
	}
	ns.Spec.Finalizers = nil
	if _, err := cs.CoreV1().Namespaces().Finalize(ctx, ns, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("finalizing namespace %s: %w", name, err)
	}
	return nil
}
