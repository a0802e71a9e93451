package bench

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/nodemesh/nodemesh/bench/load"
)

// WorkerName is the program name under which a binary that imports this
// package runs the benchmark's in-pod programs instead of its own main:
// the harness runs them through a symlink of that name to its own
// executable, so nodemeshctl and test binaries alike serve as the
// benchmark's "image" (the lab's built-in workloads cannot run them).
const WorkerName = "nodemesh-bench"

func init() {
	if filepath.Base(os.Args[0]) != WorkerName {
		return
	}
	os.Exit(WorkerMain(os.Args[1:], os.Stdout, os.Stderr))
}

// WorkerMain runs an in-pod program and returns its exit code:
//
//	serve [--size N] [--http P] [--echo P] [--sink P]   the benchmark server
//	run CONFIG-JSON                                      one load.Config; prints a load.Result as JSON
func WorkerMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: "+WorkerName+" serve [flags] | run CONFIG-JSON")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	switch args[0] {
	case "serve":
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		fs.SetOutput(stderr)
		size := fs.Int("size", 1024, "HTTP response body size")
		hp := fs.Int("http", load.DefaultHTTPPort, "HTTP port")
		ep := fs.Int("echo", load.DefaultEchoPort, "echo port")
		sp := fs.Int("sink", load.DefaultSinkPort, "sink port")
		if err := fs.Parse(args[1:]); err != nil {
			return 2
		}
		s := &load.Server{Size: *size, Log: slog.New(slog.NewTextHandler(stderr, nil))}
		// IPv4 only: the lab is IPv4, and its readiness check reads
		// /proc/<pid>/net/tcp, where a dual-stack socket does not appear.
		if err := s.Listen(ctx, "0.0.0.0", *hp, *ep, *sp); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if err := s.Serve(ctx); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		return 0
	case "run":
		if len(args) != 2 {
			fmt.Fprintln(stderr, "usage: "+WorkerName+" run CONFIG-JSON")
			return 2
		}
		var cfg load.Config
		if err := json.Unmarshal([]byte(args[1]), &cfg); err != nil {
			fmt.Fprintf(stderr, "decoding the workload config: %v\n", err)
			return 2
		}
		r, err := load.Run(ctx, nil, cfg)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if err := json.NewEncoder(stdout).Encode(r); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		return 0
	}
	fmt.Fprintf(stderr, "unknown worker command %q (serve or run)\n", args[0])
	return 2
}
