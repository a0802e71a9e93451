// Command kubelet is the upstream kubelet, built from the k8s.io/kubernetes
// Go module for the cluster tier (lab/cluster). This module is separate from
// the main one so nodemesh never requires k8s.io/kubernetes.
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	// NewKubeletCommand needs a context: nil panics in klog.
	os.Exit(cli.Run(app.NewKubeletCommand(context.Background())))
}
