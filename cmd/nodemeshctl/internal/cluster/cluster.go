// Package cluster reaches a nodemesh installation from outside the cluster,
// as kubectl would: it loads kubeconfig (--kubeconfig, $KUBECONFIG,
// ~/.kube/config; --context), finds the agent and CA pods, and opens their
// node-local admin ports through the API server's port-forward
// (pods/portforward, WebSocket first with SPDY fallback, as kubectl does),
// so no manual `kubectl port-forward` is needed.
package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// Labels of the pods the manifests install (manifests/base).
const (
	AgentSelector = "app.kubernetes.io/name=nodemesh-agent"
	CASelector    = "app.kubernetes.io/name=nodemesh-ca"
	// DefaultNamespace is where the manifests install nodemesh.
	DefaultNamespace = "nodemesh-system"
)

// Options say how to reach the cluster; empty fields take kubectl's
// defaults.
type Options struct {
	Kubeconfig string // file; "" = $KUBECONFIG, then ~/.kube/config, then in-cluster
	Context    string // kubeconfig context; "" = the current one
	Namespace  string // nodemesh's namespace; "" = DefaultNamespace
}

// Cluster is a connection to one cluster's API server.
type Cluster struct {
	REST      *rest.Config
	Client    kubernetes.Interface
	Namespace string
	Context   string // the kubeconfig context in use ("" in-cluster)
}

// Connect loads the kubeconfig and builds a client. It does not contact the
// API server.
func Connect(o Options) (*Cluster, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = o.Kubeconfig
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: o.Context})
	cfg, err := cc.ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, errors.New("no kubeconfig found: pass --kubeconfig or set $KUBECONFIG (or run on a node with --admin)")
		}
		return nil, fmt.Errorf("loading kubeconfig: %w", err)
	}
	cfg.UserAgent = "nodemeshctl"
	raw, err := cc.RawConfig()
	ctxName := o.Context
	if err == nil && ctxName == "" {
		ctxName = raw.CurrentContext
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("building the Kubernetes client: %w", err)
	}
	ns := o.Namespace
	if ns == "" {
		ns = DefaultNamespace
	}
	return &Cluster{REST: cfg, Client: client, Namespace: ns, Context: ctxName}, nil
}

// Pod is one nodemesh pod (an agent or a CA replica).
type Pod struct {
	Name  string `json:"pod"`
	Node  string `json:"node"`
	Phase string `json:"phase"`
	Ready bool   `json:"ready"` // the pod's Ready condition
	Image string `json:"image,omitempty"`
}

// Agents lists the agent pods, only the one on node when node is not "".
// It fails with an error that says what to check when there is none.
func (c *Cluster) Agents(ctx context.Context, node string) ([]Pod, error) {
	pods, err := c.pods(ctx, AgentSelector, node)
	if err != nil {
		return nil, err
	}
	if len(pods) == 0 {
		if node != "" {
			return nil, fmt.Errorf("no nodemesh agent pod on node %q in namespace %s (is the node's name right, and does the DaemonSet's node selector include it?)", node, c.Namespace)
		}
		return nil, fmt.Errorf("no nodemesh agent pods (%s) in namespace %s: is nodemesh installed there? (-n NAMESPACE)", AgentSelector, c.Namespace)
	}
	return pods, nil
}

// CAs lists the CA pods (possibly none: a SPIFFE Workload API may replace
// the built-in CA).
func (c *Cluster) CAs(ctx context.Context) ([]Pod, error) {
	return c.pods(ctx, CASelector, "")
}

func (c *Cluster) pods(ctx context.Context, selector, node string) ([]Pod, error) {
	opts := metav1.ListOptions{LabelSelector: selector}
	if node != "" {
		opts.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
	}
	list, err := c.Client.CoreV1().Pods(c.Namespace).List(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("listing pods %s in namespace %s: %w", selector, c.Namespace, err)
	}
	var out []Pod
	for _, p := range list.Items {
		if p.DeletionTimestamp != nil || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		pod := Pod{Name: p.Name, Node: p.Spec.NodeName, Phase: string(p.Status.Phase)}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodReady {
				pod.Ready = cond.Status == corev1.ConditionTrue
			}
		}
		if len(p.Spec.Containers) > 0 {
			pod.Image = p.Spec.Containers[0].Image
		}
		out = append(out, pod)
	}
	slices.SortFunc(out, func(a, b Pod) int { return strings.Compare(a.Node+"/"+a.Name, b.Node+"/"+b.Name) })
	return out, nil
}

// Forward is an open port-forward to one pod port, served on a local
// loopback port.
type Forward struct {
	// Addr is the local end, 127.0.0.1:<port>.
	Addr string

	stop   chan struct{}
	done   chan error
	once   sync.Once
	errOut *syncBuffer
}

// Forward opens a port-forward to port of pod (in c.Namespace) through the
// API server. Close it when done.
func (c *Cluster) Forward(ctx context.Context, pod string, port int) (*Forward, error) {
	u := c.Client.CoreV1().RESTClient().Post().Resource("pods").Namespace(c.Namespace).Name(pod).SubResource("portforward").URL()
	transport, upgrader, err := spdy.RoundTripperFor(c.REST)
	if err != nil {
		return nil, fmt.Errorf("building the port-forward transport: %w", err)
	}
	var dialer httpstream.Dialer = spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, u)
	ws, err := portforward.NewSPDYOverWebsocketDialer(u, c.REST)
	if err != nil {
		return nil, fmt.Errorf("building the port-forward WebSocket dialer: %w", err)
	}
	dialer = portforward.NewFallbackDialer(ws, dialer, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	f := &Forward{stop: make(chan struct{}), done: make(chan error, 1), errOut: &syncBuffer{}}
	ready := make(chan struct{})
	pf, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", port)}, f.stop, ready, io.Discard, f.errOut)
	if err != nil {
		return nil, fmt.Errorf("port-forward to %s/%s:%d: %w", c.Namespace, pod, port, err)
	}
	go func() { f.done <- pf.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-f.done:
		if err == nil {
			err = errors.New("closed before it was ready")
		}
		return nil, fmt.Errorf("port-forward to %s/%s:%d through the API server (may your user create pods/portforward in %s? is the pod running?): %w", c.Namespace, pod, port, c.Namespace, err)
	case <-ctx.Done():
		f.Close()
		return nil, fmt.Errorf("port-forward to %s/%s:%d: %w", c.Namespace, pod, port, ctx.Err())
	}
	ports, err := pf.GetPorts()
	if err != nil || len(ports) != 1 {
		f.Close()
		return nil, fmt.Errorf("port-forward to %s/%s:%d: no local port (%v)", c.Namespace, pod, port, err)
	}
	f.Addr = fmt.Sprintf("127.0.0.1:%d", ports[0].Local)
	return f, nil
}

// Errors returns what the port-forward reported about failed connections
// (for example "connection refused" inside the pod), to explain a failed
// request.
func (f *Forward) Errors() string { return strings.TrimSpace(f.errOut.String()) }

// Close stops the port-forward and waits for it to end.
func (f *Forward) Close() {
	f.once.Do(func() {
		close(f.stop)
		<-f.done
	})
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 4096 {
		return len(p), nil // bounded: the first errors explain enough
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
