package cluster

import (
	"bytes"
	"context"
	_ "embed"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Namespace is where the manifests install nodemesh.
const Namespace = "nodemesh-system"

// DemoManifest is the demo's workloads (demo.yaml): the enrolled namespace
// demo with a server Deployment behind a Service, a client and an intruder
// on node1, and an outsider in the namespace plain, not enrolled.
//
//go:embed demo.yaml
var DemoManifest string

// Install installs nodemesh as a user would: `kubectl apply -k overlay`
// (manifests/overlays/cluster, with the images already in the nodes'
// containerd: Options.Images), then it waits until the CA Deployment and
// the agent DaemonSet are rolled out through the real controllers and
// kubelets. kubectl's output goes to out.
func (c *Cluster) Install(ctx context.Context, overlay string, out io.Writer) error {
	return c.kubectlSteps(ctx, "", out,
		[]string{"apply", "-k", overlay},
		[]string{"-n", Namespace, "rollout", "status", "deployment/nodemesh-ca", "--timeout=4m"},
		[]string{"-n", Namespace, "rollout", "status", "daemonset/nodemesh-agent", "--timeout=4m"},
	)
}

// Demo applies DemoManifest and waits until its pods are Ready.
func (c *Cluster) Demo(ctx context.Context, out io.Writer) error {
	return c.kubectlSteps(ctx, DemoManifest, out,
		[]string{"apply", "-f", "-"},
		[]string{"-n", "demo", "rollout", "status", "deployment/server", "--timeout=3m"},
		[]string{"-n", "demo", "wait", "--for=condition=Ready", "pod/client", "pod/intruder", "--timeout=3m"},
		[]string{"-n", "plain", "wait", "--for=condition=Ready", "pod/outsider", "--timeout=3m"},
	)
}

// kubectlSteps runs kubectl once per step (the first with stdin), each
// after the one before succeeded.
func (c *Cluster) kubectlSteps(ctx context.Context, stdin string, out io.Writer, steps ...[]string) error {
	for i, args := range steps {
		cmd := c.Kubectl(ctx, args...)
		if i == 0 && stdin != "" {
			cmd.Stdin = strings.NewReader(stdin)
		}
		var b bytes.Buffer
		cmd.Stdout, cmd.Stderr = io.MultiWriter(out, &b), io.MultiWriter(out, &b)
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, tail(bytes.TrimSpace(b.Bytes()), 2000))
		}
	}
	return nil
}

// Status is what `nodemeshctl cluster status` shows of a cluster.
type Status struct {
	ID         string       `json:"id"`
	StateDir   string       `json:"stateDir"`
	APIServer  string       `json:"apiServer"`
	Kubeconfig string       `json:"kubeconfig"`
	Kubectl    string       `json:"kubectl"`
	Underlay   string       `json:"underlayBridge"`
	Nodes      []NodeStatus `json:"nodes"`
}

// NodeStatus is one node as its state and the API server show it.
type NodeStatus struct {
	Name     string `json:"name"`
	IP       string `json:"ip"`
	PodCIDR  string `json:"podCIDR"`
	Hostname string `json:"hostname"`
	// Containerd is the node's containerd socket, for ctr --address.
	Containerd string `json:"containerd"`
	// Ready is the node's Ready condition ("True", "False", "Unknown"),
	// or the error reading the Node.
	Ready   string `json:"ready"`
	Kubelet string `json:"kubelet,omitempty"`
	Runtime string `json:"runtime,omitempty"`
}

// Status reads the cluster's nodes from the API server.
func (c *Cluster) Status(ctx context.Context) Status {
	st := Status{ID: c.ID, StateDir: c.Dir, APIServer: c.Server.URL, Kubeconfig: c.Kubeconfig(), Kubectl: filepath.Join(c.BinDir, "kubectl"), Underlay: c.Bridge()}
	for _, n := range c.Nodes {
		ns := NodeStatus{Name: n.Name, IP: n.IP, PodCIDR: n.PodCIDR, Hostname: c.Hostname(n), Containerd: n.Socket, Ready: "Unknown"}
		kn, err := c.Server.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			ns.Ready = "error: " + err.Error()
		} else {
			for _, cond := range kn.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					ns.Ready = string(cond.Status)
				}
			}
			ns.Kubelet, ns.Runtime = kn.Status.NodeInfo.KubeletVersion, kn.Status.NodeInfo.ContainerRuntimeVersion
		}
		st.Nodes = append(st.Nodes, ns)
	}
	return st
}
