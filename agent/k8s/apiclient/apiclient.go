// Package apiclient is the agent's client for the Kubernetes API: typed
// list, watch and write access to the few resources the agent uses, and
// informers over them.
//
// client-go's clientset (k8s.io/client-go/kubernetes), its informer
// factory (k8s.io/client-go/informers), its discovery client and the
// dynamic informer factory all reach k8s.io/client-go/kubernetes/scheme,
// which registers every API group Kubernetes serves. That links the code of
// every group into the binary, and each node's agent keeps most of it
// resident (docs/scale.md, "The agent's binary"). This package registers
// only the groups the agent reads and writes: core, discovery, networking
// and coordination. Its requests are the ones client-go's generated clients
// make (it uses the same k8s.io/client-go/gentype clients, preferring
// protobuf), so API-server load and watch semantics are unchanged.
//
// Everything that takes an API client takes an Interface. Tests adapt
// client-go's fake clientset with apiclienttest.FromClientset.
package apiclient

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/gentype"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/flowcontrol"
)

// ListWatcher lists and watches one resource.
type ListWatcher[L runtime.Object] interface {
	List(ctx context.Context, opts metav1.ListOptions) (L, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
}

// Resource reads and writes one resource, in one namespace or, with the
// namespace "", in all of them (or cluster-scoped). client-go's typed
// clients (clientset.CoreV1().Pods(ns)) have the same methods.
type Resource[T runtime.Object, L runtime.Object] interface {
	ListWatcher[L]
	Get(ctx context.Context, name string, opts metav1.GetOptions) (T, error)
	Create(ctx context.Context, obj T, opts metav1.CreateOptions) (T, error)
	Update(ctx context.Context, obj T, opts metav1.UpdateOptions) (T, error)
	Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error
}

// Interface is the API the agent uses. *Client implements it against an
// API server.
type Interface interface {
	Namespaces() Resource[*corev1.Namespace, *corev1.NamespaceList]
	Nodes() Resource[*corev1.Node, *corev1.NodeList]
	Pods(namespace string) Resource[*corev1.Pod, *corev1.PodList]
	Services(namespace string) Resource[*corev1.Service, *corev1.ServiceList]
	ConfigMaps(namespace string) Resource[*corev1.ConfigMap, *corev1.ConfigMapList]
	EndpointSlices(namespace string) Resource[*discoveryv1.EndpointSlice, *discoveryv1.EndpointSliceList]
	NetworkPolicies(namespace string) Resource[*networkingv1.NetworkPolicy, *networkingv1.NetworkPolicyList]
	Leases(namespace string) Resource[*coordinationv1.Lease, *coordinationv1.LeaseList]
	// ServerResourcesForGroupVersion lists the resources the API server
	// serves in groupVersion ("v1" or "group/version"); an unserved group
	// version is an error for which apierrors.IsNotFound is true.
	ServerResourcesForGroupVersion(groupVersion string) (*metav1.APIResourceList, error)
}

// The scheme holds only the groups above, and the meta types every group
// version uses (Status, WatchEvent, APIResourceList, the option types).
var (
	scheme         = runtime.NewScheme()
	codecs         = serializer.NewCodecFactory(scheme)
	parameterCodec = runtime.NewParameterCodec(scheme)
)

func init() {
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	utilruntime.Must(corev1.AddToScheme(scheme))
	utilruntime.Must(discoveryv1.AddToScheme(scheme))
	utilruntime.Must(networkingv1.AddToScheme(scheme))
	utilruntime.Must(coordinationv1.AddToScheme(scheme))
}

// Client talks to an API server.
type Client struct {
	core, discovery, networking, coordination rest.Interface
}

var _ Interface = (*Client)(nil)

// New returns a client for cfg. Like client-go's clientset, its groups
// share one HTTP transport and, when cfg sets QPS without a RateLimiter,
// one rate limiter.
func New(cfg *rest.Config) (*Client, error) {
	c := *cfg
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	if c.RateLimiter == nil && c.QPS > 0 {
		if c.Burst <= 0 {
			return nil, fmt.Errorf("API client: burst must be above 0 when QPS is set (QPS %v)", c.QPS)
		}
		c.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(c.QPS, c.Burst)
	}
	h, err := rest.HTTPClientFor(&c)
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	group := func(gv schema.GroupVersion, apiPath string) (rest.Interface, error) {
		gc := c
		gc.GroupVersion = &gv
		gc.APIPath = apiPath
		gc.NegotiatedSerializer = rest.CodecFactoryForGeneratedClient(scheme, codecs).WithoutConversion()
		rc, err := rest.RESTClientForConfigAndClient(&gc, h)
		if err != nil {
			return nil, fmt.Errorf("API client for %s: %w", gv, err)
		}
		return rc, nil
	}
	var out Client
	for _, g := range []struct {
		dst  *rest.Interface
		gv   schema.GroupVersion
		path string
	}{
		{&out.core, corev1.SchemeGroupVersion, "/api"},
		{&out.discovery, discoveryv1.SchemeGroupVersion, "/apis"},
		{&out.networking, networkingv1.SchemeGroupVersion, "/apis"},
		{&out.coordination, coordinationv1.SchemeGroupVersion, "/apis"},
	} {
		if *g.dst, err = group(g.gv, g.path); err != nil {
			return nil, err
		}
	}
	return &out, nil
}

func resource[T interface {
	runtime.Object
	metav1.Object
}, L runtime.Object](c rest.Interface, name, namespace string, newT func() T, newL func() L) Resource[T, L] {
	return gentype.NewClientWithList(name, c, parameterCodec, namespace, newT, newL, gentype.PrefersProtobuf[T]())
}

// Namespaces are cluster-scoped.
func (c *Client) Namespaces() Resource[*corev1.Namespace, *corev1.NamespaceList] {
	return resource(c.core, "namespaces", "", func() *corev1.Namespace { return &corev1.Namespace{} }, func() *corev1.NamespaceList { return &corev1.NamespaceList{} })
}

// Nodes are cluster-scoped.
func (c *Client) Nodes() Resource[*corev1.Node, *corev1.NodeList] {
	return resource(c.core, "nodes", "", func() *corev1.Node { return &corev1.Node{} }, func() *corev1.NodeList { return &corev1.NodeList{} })
}

// Pods in namespace ("" = all).
func (c *Client) Pods(namespace string) Resource[*corev1.Pod, *corev1.PodList] {
	return resource(c.core, "pods", namespace, func() *corev1.Pod { return &corev1.Pod{} }, func() *corev1.PodList { return &corev1.PodList{} })
}

// Services in namespace ("" = all).
func (c *Client) Services(namespace string) Resource[*corev1.Service, *corev1.ServiceList] {
	return resource(c.core, "services", namespace, func() *corev1.Service { return &corev1.Service{} }, func() *corev1.ServiceList { return &corev1.ServiceList{} })
}

// ConfigMaps in namespace ("" = all).
func (c *Client) ConfigMaps(namespace string) Resource[*corev1.ConfigMap, *corev1.ConfigMapList] {
	return resource(c.core, "configmaps", namespace, func() *corev1.ConfigMap { return &corev1.ConfigMap{} }, func() *corev1.ConfigMapList { return &corev1.ConfigMapList{} })
}

// EndpointSlices in namespace ("" = all).
func (c *Client) EndpointSlices(namespace string) Resource[*discoveryv1.EndpointSlice, *discoveryv1.EndpointSliceList] {
	return resource(c.discovery, "endpointslices", namespace, func() *discoveryv1.EndpointSlice { return &discoveryv1.EndpointSlice{} }, func() *discoveryv1.EndpointSliceList { return &discoveryv1.EndpointSliceList{} })
}

// NetworkPolicies in namespace ("" = all).
func (c *Client) NetworkPolicies(namespace string) Resource[*networkingv1.NetworkPolicy, *networkingv1.NetworkPolicyList] {
	return resource(c.networking, "networkpolicies", namespace, func() *networkingv1.NetworkPolicy { return &networkingv1.NetworkPolicy{} }, func() *networkingv1.NetworkPolicyList { return &networkingv1.NetworkPolicyList{} })
}

// Leases in namespace ("" = all).
func (c *Client) Leases(namespace string) Resource[*coordinationv1.Lease, *coordinationv1.LeaseList] {
	return resource(c.coordination, "leases", namespace, func() *coordinationv1.Lease { return &coordinationv1.Lease{} }, func() *coordinationv1.LeaseList { return &coordinationv1.LeaseList{} })
}

// ServerResourcesForGroupVersion asks the API server's discovery endpoint
// for one group version, as client-go's discovery client does.
func (c *Client) ServerResourcesForGroupVersion(groupVersion string) (*metav1.APIResourceList, error) {
	if groupVersion == "" {
		return nil, fmt.Errorf("discovering resources: empty group version")
	}
	path := "/apis/" + groupVersion
	if groupVersion == "v1" {
		path = "/api/v1"
	}
	out := &metav1.APIResourceList{GroupVersion: groupVersion}
	ctx, cancel := context.WithTimeout(context.Background(), discoveryTimeout)
	defer cancel()
	if err := c.core.Get().AbsPath(path).Do(ctx).Into(out); err != nil {
		return nil, err
	}
	return out, nil
}

// discoveryTimeout bounds one discovery request (client-go's discovery
// client uses 32 s when the config sets none).
const discoveryTimeout = 32 * time.Second

// NewInformer returns an informer of lw's objects, which are like example.
// tweak, if not nil, edits the options of every list and watch (selectors).
// The informer has no indexes: the agent reads objects from its event
// handlers, and an index costs memory per object.
func NewInformer[L runtime.Object](lw ListWatcher[L], example runtime.Object, resync time.Duration, tweak func(*metav1.ListOptions)) cache.SharedIndexInformer {
	return cache.NewSharedIndexInformer(ListWatch(lw, tweak), example, resync, cache.Indexers{})
}

// ListWatch adapts lw to client-go's cache.ListerWatcher.
func ListWatch[L runtime.Object](lw ListWatcher[L], tweak func(*metav1.ListOptions)) *cache.ListWatch {
	if tweak == nil {
		tweak = func(*metav1.ListOptions) {}
	}
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			tweak(&o)
			l, err := lw.List(ctx, o)
			if err != nil {
				// Never a typed nil in a non-nil interface.
				return nil, err
			}
			return l, nil
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			tweak(&o)
			return lw.Watch(ctx, o)
		},
	}
}
