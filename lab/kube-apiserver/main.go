// Command kube-apiserver builds the upstream Kubernetes API server from the
// k8s.io/kubernetes Go module. It lives in its own module so that the main
// nodemesh module never requires k8s.io/kubernetes; the lab runs the binary
// this produces against a local etcd.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
