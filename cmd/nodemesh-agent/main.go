// Command nodemesh-agent is the node agent. This package reads and
// validates its flags; agent/node runs it: it watches the cluster
// (agent/k8s into agent/state), captures the enrolled pods of its node
// (redirect, agent/workloads, agent/dataplane), holds their SVIDs
// (identity/svid), proxies their connections through HBONE tunnels
// (agent/proxy, agent/hbone) with agent/resolve and under policy
// (agent/enforce, agent/policy), reports them (agent/telemetry), and serves
// admin, metrics and readiness (agent/admin). docs/architecture.md has the
// code map.
//
// SIGTERM or SIGINT: the agent turns unready, stops accepting, lets open
// connections finish until --drain-deadline, resets the rest, and exits.
// Capture stays pinned in the kernel, so enrolled pods fail closed until
// the next agent adopts them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/node"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "cni-uninstall" {
		os.Exit(cniUninstall(os.Args[2:], os.Stdout, os.Stderr))
	}
	cfg, err := parseConfig(os.Args[1:], os.Getenv)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "nodemesh-agent: invalid configuration:\n%v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, cfg, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "nodemesh-agent: %v\n", err)
		os.Exit(1)
	}
}

// run runs the agent until ctx ends, then shuts it down in order.
func run(ctx context.Context, cfg *Config, stdout, stderr io.Writer) error {
	level := new(slog.LevelVar)
	level.Set(cfg.level)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})).With("node", cfg.NodeName)
	var access *slog.Logger
	if cfg.AccessLog {
		access = admin.NewAccessLog(stdout)
	}
	rc, err := cfg.restConfig()
	if err != nil {
		return err
	}
	n, err := node.New(cfg.nodeConfig(rc, log, level, access))
	if err != nil {
		return err
	}
	return n.Run(ctx)
}
