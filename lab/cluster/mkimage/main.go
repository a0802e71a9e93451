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
	busybox := flag.String("busybox", "/bin/busybox", "static busybox for the uninstall cleanup image localhost/busybox:debian (Debian package busybox-static); \"\" leaves that image out")
	flag.Parse()
	imgs := image.Nodemesh(*tag)
	for i := range imgs {
		imgs[i].LDFlags = *ldflags
	}
	if *busybox != "" {
		if _, err := os.Stat(*busybox); err != nil {
			fmt.Fprintf(os.Stderr, "mkimage: the uninstall cleanup image needs a static busybox (apt-get install busybox-static, or -busybox=\"\" to leave it out): %v\n", err)
			os.Exit(1)
		}
		bb := image.Busybox()
		bb.File = *busybox
		imgs = append(imgs, bb)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := image.Build(ctx, ".", *out, imgs, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s; load it with: ctr -n k8s.io images import %s\n", *out, *out)
}
