package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/cache"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient"
	l7v1alpha1 "github.com/nodemesh/nodemesh/agent/l7/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// Gateway API routes (the GAMMA mesh profile) for L7 routing (agent/l7).
var (
	HTTPRouteResource = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}
	GRPCRouteResource = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "grpcroutes"}
)

// DefaultCustomResources are the custom resources the agent watches: the
// nodemesh CRDs and the Gateway API routes (absent CRDs count as empty
// until they are installed).
var DefaultCustomResources = []schema.GroupVersionResource{
	v1alpha1.AuthorizationPolicyResource,
	v1alpha1.PeerAuthenticationResource,
	HTTPRouteResource,
	GRPCRouteResource,
	l7v1alpha1.TrafficPolicyResource,
}

// Informers feeds a store from the API server with client-go informers.
type Informers struct {
	Client apiclient.Interface
	// Dynamic watches CustomResources; nil watches none.
	Dynamic dynamic.Interface
	Store   *state.Store
	Log     *slog.Logger
	// CustomResources to watch; nil means DefaultCustomResources. A resource
	// whose CRD is not installed is treated as empty and looked for again
	// every CRDRecheck.
	CustomResources []schema.GroupVersionResource
	// CRDRecheck defaults to 30 s.
	CRDRecheck time.Duration
	// Resync is the informers' resync period; 0 (the default) disables it:
	// the store is level-based already.
	Resync time.Duration
	// Node is the node the agent runs on: pods of other nodes are cached
	// and stored without the detail only their own node's agent reads
	// (TransformFor). "" keeps every pod's detail.
	Node string
}

// Run starts the informers, marks the store synced once every cache has
// listed, and keeps the store current until ctx ends. It returns nil when
// ctx ends after a successful sync, or an error if the initial sync could
// not finish.
func (in *Informers) Run(ctx context.Context) error {
	if in.Client == nil || in.Store == nil {
		return errors.New("starting informers: Client and Store are required")
	}
	log := in.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var run informerRuns
	defer run.wait()
	defer cancel() // before the wait: the informers stop with ctx
	var synced []cache.InformerSynced
	add := func(kind string, inf cache.SharedIndexInformer, h cache.ResourceEventHandler) error {
		if err := inf.SetTransform(TransformFor(in.Node)); err != nil {
			return fmt.Errorf("setting %s transform: %w", kind, err)
		}
		if err := inf.SetWatchErrorHandlerWithContext(watchErrorLogger(log, kind)); err != nil {
			return fmt.Errorf("setting %s watch error handler: %w", kind, err)
		}
		reg, err := inf.AddEventHandler(h)
		if err != nil {
			return fmt.Errorf("adding %s event handler: %w", kind, err)
		}
		synced = append(synced, reg.HasSynced)
		run.start(ctx, inf)
		return nil
	}
	api, resync := in.Client, in.Resync
	st := in.Store
	handlers := []struct {
		kind string
		inf  cache.SharedIndexInformer
		h    cache.ResourceEventHandler
	}{
		{"namespaces", apiclient.NewInformer(api.Namespaces(), &corev1.Namespace{}, resync, nil), handler(st, log, "namespace",
			func(tx *state.Tx, n *corev1.Namespace) error { tx.SetNamespace(ConvertNamespace(n)); return nil },
			func(tx *state.Tx, n *corev1.Namespace) { tx.DeleteNamespace(n.Name) })},
		{"nodes", apiclient.NewInformer(api.Nodes(), &corev1.Node{}, resync, nil), handler(st, log, "node",
			func(tx *state.Tx, n *corev1.Node) error {
				c, err := ConvertNode(n)
				if err == nil {
					tx.SetNode(c)
				}
				return err
			},
			func(tx *state.Tx, n *corev1.Node) { tx.DeleteNode(n.Name) })},
		{"pods", apiclient.NewInformer(api.Pods(""), &corev1.Pod{}, resync, nil), handler(st, log, "pod", setCachedPod, deleteCachedPod)},
		{"services", apiclient.NewInformer(api.Services(""), &corev1.Service{}, resync, nil), handler(st, log, "service",
			func(tx *state.Tx, s *corev1.Service) error {
				c, err := ConvertService(s)
				if err == nil {
					tx.SetService(c)
				}
				return err
			},
			func(tx *state.Tx, s *corev1.Service) {
				tx.DeleteService(state.Key{Namespace: s.Namespace, Name: s.Name})
			})},
		{"endpointslices", apiclient.NewInformer(api.EndpointSlices(""), &discoveryv1.EndpointSlice{}, resync, nil), handler(st, log, "endpointslice",
			func(tx *state.Tx, es *discoveryv1.EndpointSlice) error {
				c, err := ConvertEndpointSlice(es)
				if err == nil {
					tx.SetEndpointSlice(c)
				}
				return err
			},
			func(tx *state.Tx, es *discoveryv1.EndpointSlice) {
				tx.DeleteEndpointSlice(state.Key{Namespace: es.Namespace, Name: es.Name})
			})},
		{"networkpolicies", apiclient.NewInformer(api.NetworkPolicies(""), &networkingv1.NetworkPolicy{}, resync, nil), handler(st, log, "networkpolicy",
			func(tx *state.Tx, np *networkingv1.NetworkPolicy) error { tx.SetNetworkPolicy(np); return nil },
			func(tx *state.Tx, np *networkingv1.NetworkPolicy) {
				tx.DeleteNetworkPolicy(state.Key{Namespace: np.Namespace, Name: np.Name})
			})},
	}
	for _, h := range handlers {
		if err := add(h.kind, h.inf, h.h); err != nil {
			return err
		}
	}

	var missing []schema.GroupVersionResource
	if in.Dynamic != nil {
		crs := in.CustomResources
		if crs == nil {
			crs = DefaultCustomResources
		}
		for _, gvr := range crs {
			ok, err := in.served(gvr)
			if err != nil {
				return err
			}
			if !ok {
				// The Gateway API is optional (only L7 routing reads it);
				// nodemesh's own CRDs are part of the install.
				level := slog.LevelWarn
				if gvr.Group == HTTPRouteResource.Group {
					level = slog.LevelInfo
				}
				log.Log(ctx, level, "custom resource not served by the API server, treating it as empty until its CRD is installed", "resource", gvr.String())
				missing = append(missing, gvr)
				continue
			}
			if err := in.addCustom(ctx, &run, gvr, log, func(s cache.InformerSynced) { synced = append(synced, s) }); err != nil {
				return err
			}
		}
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	start := time.Now()
	log.Info("waiting for the informers' initial list")
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return fmt.Errorf("syncing informers with the API server: %w (is the API server reachable and does the agent's service account may list pods, services, endpointslices, namespaces, nodes, networkpolicies?)", context.Cause(ctx))
	}
	st.MarkSynced()
	log.Info("cluster state synced", "version", st.Version(), "took", time.Since(start).Round(time.Millisecond))

	if len(missing) > 0 {
		wg.Go(func() { in.recheckCRDs(ctx, &run, missing, log) })
	}
	<-ctx.Done()
	return nil
}

func (in *Informers) served(gvr schema.GroupVersionResource) (bool, error) {
	list, err := in.Client.ServerResourcesForGroupVersion(gvr.GroupVersion().String())
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("discovering %s: %w", gvr.GroupVersion(), err)
	}
	for _, r := range list.APIResources {
		if r.Name == gvr.Resource {
			return true, nil
		}
	}
	return false, nil
}

func (in *Informers) addCustom(ctx context.Context, run *informerRuns, gvr schema.GroupVersionResource, log *slog.Logger, onSynced func(cache.InformerSynced)) error {
	inf := apiclient.NewInformer(in.Dynamic.Resource(gvr), &unstructured.Unstructured{}, in.Resync, nil)
	if err := inf.SetTransform(TransformFor(in.Node)); err != nil {
		return fmt.Errorf("setting %s transform: %w", gvr.Resource, err)
	}
	if err := inf.SetWatchErrorHandlerWithContext(watchErrorLogger(log, gvr.Resource)); err != nil {
		return fmt.Errorf("setting %s watch error handler: %w", gvr.Resource, err)
	}
	reg, err := inf.AddEventHandler(handler(in.Store, log, gvr.Resource,
		func(tx *state.Tx, u *unstructured.Unstructured) error { tx.SetObject(ConvertObject(u)); return nil },
		func(tx *state.Tx, u *unstructured.Unstructured) {
			gvk := u.GroupVersionKind()
			tx.DeleteObject(state.GroupKind{Group: gvk.Group, Kind: gvk.Kind}, state.Key{Namespace: u.GetNamespace(), Name: u.GetName()})
		}))
	if err != nil {
		return fmt.Errorf("adding %s event handler: %w", gvr.Resource, err)
	}
	onSynced(reg.HasSynced)
	run.start(ctx, inf)
	return nil
}

// recheckCRDs starts informers for custom resources whose CRDs appear after
// the agent started.
func (in *Informers) recheckCRDs(ctx context.Context, run *informerRuns, missing []schema.GroupVersionResource, log *slog.Logger) {
	every := in.CRDRecheck
	if every <= 0 {
		every = 30 * time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for len(missing) > 0 {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var still []schema.GroupVersionResource
		for _, gvr := range missing {
			ok, err := in.served(gvr)
			if err == nil && ok {
				err = in.addCustom(ctx, run, gvr, log, func(cache.InformerSynced) {})
			}
			if err != nil || !ok {
				if err != nil {
					log.Warn("checking for a custom resource", "resource", gvr.String(), "err", err)
				}
				still = append(still, gvr)
				continue
			}
			log.Info("custom resource appeared, watching it", "resource", gvr.String())
		}
		missing = still
	}
}

// informerRuns runs informers until their context ends.
type informerRuns struct{ wg sync.WaitGroup }

func (r *informerRuns) start(ctx context.Context, inf cache.SharedIndexInformer) {
	r.wg.Go(func() { inf.RunWithContext(ctx) })
}

// wait returns once every informer started has stopped.
func (r *informerRuns) wait() { r.wg.Wait() }

// setCachedPod stores the pod the transform converted (CompactPod), or
// returns its conversion error.
func setCachedPod(tx *state.Tx, c *CachedPod) error {
	if err := c.Err(); err != nil {
		return err
	}
	tx.SetPod(c.Pod)
	return nil
}

func deleteCachedPod(tx *state.Tx, c *CachedPod) { tx.DeletePod(c.Pod.Key()) }

func watchErrorLogger(log *slog.Logger, kind string) cache.WatchErrorHandlerWithContext {
	return func(_ context.Context, _ *cache.Reflector, err error) {
		// The cache, and so the store, keep the last state: say so, so an
		// operator knows decisions continue on possibly stale data.
		log.Warn("watch of the API server failed, keeping the last known state", "kind", kind, "err", err)
	}
}

// handler adapts typed set/delete functions to informer events. An object
// that does not convert is removed from the store (its old version would be
// wrong) and logged.
func handler[T any](st *state.Store, log *slog.Logger, kind string, set func(*state.Tx, T) error, del func(*state.Tx, T)) cache.ResourceEventHandler {
	apply := func(obj any) {
		o, ok := obj.(T)
		if !ok {
			log.Error("informer delivered an unexpected type", "kind", kind, "type", fmt.Sprintf("%T", obj))
			return
		}
		var err error
		st.Update(func(tx *state.Tx) {
			if err = set(tx, o); err != nil {
				del(tx, o)
			}
		})
		if err != nil {
			log.Warn("ignoring an object the agent cannot use", "kind", kind, "err", err)
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    apply,
		UpdateFunc: func(_, obj any) { apply(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			o, ok := obj.(T)
			if !ok {
				log.Error("informer delivered an unexpected type on delete", "kind", kind, "type", fmt.Sprintf("%T", obj))
				return
			}
			st.Update(func(tx *state.Tx) { del(tx, o) })
		},
	}
}
