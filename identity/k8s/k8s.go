// Package k8s connects the agent's identity pieces to the Kubernetes API:
// a pod informer (this node's pods only) that tells the SVID manager which
// identities are wanted, and a ConfigMap informer that reloads the trust
// bundle the CA publishes, without a restart.
package k8s

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/tools/cache"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Wanter is told which identities the node's pods run as (svid.Manager).
type Wanter interface {
	Add(owner string, id spiffeid.ID) error
	Remove(owner string)
}

// PodWatcherConfig configures RunPodWatcher.
type PodWatcherConfig struct {
	Client      apiclient.Interface
	Node        string
	TrustDomain spiffeid.TrustDomain
	Target      Wanter
	// Filter selects the pods that get identities (e.g. enrolled ones);
	// nil means every running pod on the node.
	Filter func(*corev1.Pod) bool
	Log    *slog.Logger
	// Resync is the informer resync period; default 10m.
	Resync time.Duration
}

// RunPodWatcher watches the pods scheduled on cfg.Node and keeps
// cfg.Target's wanted set equal to the identities of the running ones,
// keyed by pod UID. It blocks until ctx ends.
func RunPodWatcher(ctx context.Context, cfg PodWatcherConfig) error {
	if cfg.Client == nil || cfg.Target == nil || cfg.Log == nil {
		return errors.New("running pod watcher: client, target and logger are required")
	}
	if cfg.Node == "" {
		return errors.New("running pod watcher: node name is empty (set NODE_NAME from spec.nodeName via the downward API)")
	}
	if cfg.TrustDomain.IsZero() {
		return errors.New("running pod watcher: empty trust domain")
	}
	if cfg.Resync == 0 {
		cfg.Resync = 10 * time.Minute
	}
	inf := apiclient.NewInformer(cfg.Client.Pods(""), &corev1.Pod{}, cfg.Resync, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.Node).String()
	})
	sync := func(obj any) {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		uid := string(pod.UID)
		if !wanted(pod, cfg.Filter) {
			cfg.Target.Remove(uid)
			return
		}
		sa := pod.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		id, err := identity.WorkloadID(cfg.TrustDomain, pod.Namespace, sa)
		if err != nil {
			cfg.Log.Warn("pod gets no identity", "pod", pod.Namespace+"/"+pod.Name, "error", err)
			cfg.Target.Remove(uid)
			return
		}
		if err := cfg.Target.Add(uid, id); err != nil {
			cfg.Log.Warn("pod gets no identity", "pod", pod.Namespace+"/"+pod.Name, "error", err)
		}
	}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    sync,
		UpdateFunc: func(_, obj any) { sync(obj) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				cfg.Target.Remove(string(pod.UID))
			}
		},
	})
	if err != nil {
		return fmt.Errorf("running pod watcher: adding handler: %w", err)
	}
	inf.RunWithContext(ctx)
	return nil
}

// wanted: running, not terminating, on the node (the selector guarantees
// the node) and selected by filter. The CA signs only for running pods, so
// asking earlier would only collect refusals.
func wanted(p *corev1.Pod, filter func(*corev1.Pod) bool) bool {
	if p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil || p.Spec.HostNetwork {
		return false
	}
	return filter == nil || filter(p)
}

// BundleSetter receives a reloaded trust bundle (svid.Manager.SetBundle).
type BundleSetter func(roots []*x509.Certificate) error

// RunBundleWatcher watches ConfigMap namespace/name (the CA publishes
// identity.BundleConfigMap) and calls set with its roots on every change.
// A malformed bundle is logged and ignored: the last good one stays.
func RunBundleWatcher(ctx context.Context, c apiclient.Interface, namespace, name string, set BundleSetter, log *slog.Logger) error {
	if c == nil || set == nil || log == nil {
		return errors.New("running bundle watcher: client, setter and logger are required")
	}
	inf := apiclient.NewInformer(c.ConfigMaps(namespace), &corev1.ConfigMap{}, 10*time.Minute, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
	})
	load := func(obj any) {
		cm, ok := obj.(*corev1.ConfigMap)
		if !ok || cm.Name != name {
			return
		}
		roots, err := ParseBundle([]byte(cm.Data[identity.BundleKey]))
		if err != nil {
			log.Error("ignoring malformed trust bundle; keeping the previous one", "configmap", namespace+"/"+name, "error", err)
			return
		}
		if err := set(roots); err != nil {
			log.Error("loading trust bundle", "configmap", namespace+"/"+name, "error", err)
		}
	}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    load,
		UpdateFunc: func(_, obj any) { load(obj) },
		DeleteFunc: func(any) {
			log.Warn("trust bundle ConfigMap deleted; keeping the last bundle", "configmap", namespace+"/"+name)
		},
	})
	if err != nil {
		return fmt.Errorf("running bundle watcher: adding handler: %w", err)
	}
	inf.RunWithContext(ctx)
	return nil
}

// ParseBundle decodes PEM certificates; every block must be a CA certificate.
func ParseBundle(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("trust bundle holds a %q PEM block; only CERTIFICATE is allowed", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("trust bundle certificate %d: %w", len(out)+1, err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("trust bundle certificate %d (%s) is not a CA certificate", len(out)+1, c.Subject)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("trust bundle has no PEM certificates under key %s", identity.BundleKey)
	}
	return out, nil
}
