package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/nodemesh/nodemesh/agent/cni"
)

// cniUninstall is `nodemesh-agent cni-uninstall`: it removes what the
// agent's CNI install put on the node (the plugin's conflist entry, its
// binary, a socket and namespace table left behind). The uninstall's node cleanup runs it
// (manifests/uninstall) as an init container.
func cniUninstall(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("nodemesh-agent cni-uninstall", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg cni.InstallConfig
	fs.StringVar(&cfg.ConfDir, "cni-conf-dir", "", "the node's CNI configuration directory as mounted")
	fs.StringVar(&cfg.BinDir, "cni-bin-dir", "", "the node's CNI plugin directory as mounted")
	fs.StringVar(&cfg.Socket, "cni-socket", "", "the agent's CNI socket, removed if left behind with the namespace table beside it")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if cfg.ConfDir == "" || cfg.BinDir == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "nodemesh-agent cni-uninstall: --cni-conf-dir and --cni-bin-dir are required, and nothing else")
		return 2
	}
	if err := cni.Uninstall(cfg); err != nil {
		fmt.Fprintf(stderr, "nodemesh-agent cni-uninstall: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "nodemesh CNI plugin removed from %s and %s\n", cfg.ConfDir, cfg.BinDir)
	return 0
}
