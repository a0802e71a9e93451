// Command pause is the sandbox ("pause") container of the cluster tier's
// nodes: it holds the pod's namespaces, reaps orphans (it is the pod's
// PID 1 when the PID namespace is shared) and exits on SIGTERM or SIGINT.
// The upstream image (registry.k8s.io/pause) cannot be pulled here, so
// lab/cluster/image builds this one into localhost/nodemesh-pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
