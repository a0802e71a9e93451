// Command kube-proxy is the upstream kube-proxy, built from the
// k8s.io/kubernetes Go module for the cluster tier (lab/cluster), which runs
// it in nftables mode inside each node's network namespace.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-proxy/app"
)

func main() {
	os.Exit(cli.Run(app.NewProxyCommand()))
}
