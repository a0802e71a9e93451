// Command mkimage builds nodemesh's container images without a Docker
// engine (make image): one archive that `ctr -n k8s.io images import`
// loads into containerd. See lab/cluster/image.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/nodemesh/nodemesh/lab/cluster/image"
)

func main() {
	tag := flag.String("tag", "dev", "tag of the nodemesh images (localhost/nodemesh-*:TAG)")
	out := flag.String("o", "bin/images.tar", "image archive to write")
	ldflags := flag.String("ldflags", "", "more go build -ldflags for the binaries (make passes the version stamp)")
	flag.Parse()
	imgs := image.Nodemesh(*tag)
	for i := range imgs {
		imgs[i].LDFlags = *ldflags
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := image.Build(ctx, ".", *out, imgs, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s; load it with: ctr -n k8s.io images import %s\n", *out, *out)
}
