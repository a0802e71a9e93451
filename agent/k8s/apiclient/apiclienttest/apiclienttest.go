// Package apiclienttest adapts client-go's clientset, and so its fake
// clientset, to apiclient.Interface for tests. The agent's binary must not
// import it: it links every API group (see package apiclient).
package apiclienttest

import (
	"testing"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient"
)

// FromClientset serves apiclient.Interface from cs.
func FromClientset(cs kubernetes.Interface) apiclient.Interface { return clientset{cs} }

type clientset struct{ cs kubernetes.Interface }

func (c clientset) Namespaces() apiclient.Resource[*corev1.Namespace, *corev1.NamespaceList] {
	return c.cs.CoreV1().Namespaces()
}

func (c clientset) Nodes() apiclient.Resource[*corev1.Node, *corev1.NodeList] {
	return c.cs.CoreV1().Nodes()
}

func (c clientset) Pods(ns string) apiclient.Resource[*corev1.Pod, *corev1.PodList] {
	return c.cs.CoreV1().Pods(ns)
}

func (c clientset) Services(ns string) apiclient.Resource[*corev1.Service, *corev1.ServiceList] {
	return c.cs.CoreV1().Services(ns)
}

func (c clientset) ConfigMaps(ns string) apiclient.Resource[*corev1.ConfigMap, *corev1.ConfigMapList] {
	return c.cs.CoreV1().ConfigMaps(ns)
}

func (c clientset) EndpointSlices(ns string) apiclient.Resource[*discoveryv1.EndpointSlice, *discoveryv1.EndpointSliceList] {
	return c.cs.DiscoveryV1().EndpointSlices(ns)
}

func (c clientset) NetworkPolicies(ns string) apiclient.Resource[*networkingv1.NetworkPolicy, *networkingv1.NetworkPolicyList] {
	return c.cs.NetworkingV1().NetworkPolicies(ns)
}

func (c clientset) Leases(ns string) apiclient.Resource[*coordinationv1.Lease, *coordinationv1.LeaseList] {
	return c.cs.CoordinationV1().Leases(ns)
}

func (c clientset) ServerResourcesForGroupVersion(gv string) (*metav1.APIResourceList, error) {
	return c.cs.Discovery().ServerResourcesForGroupVersion(gv)
}

// New returns the agent's real client for cfg, failing tb if it cannot be
// built.
func New(tb testing.TB, cfg *rest.Config) *apiclient.Client {
	tb.Helper()
	c, err := apiclient.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}
