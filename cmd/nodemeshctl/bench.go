package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/nodemesh/nodemesh/bench"
)

const benchUsage = `usage: nodemeshctl bench [--profile quick|full|scale|scale-smoke] [--out DIR] [--dir STATEDIR] [--id ID]
                        [--scenarios LIST] [--agent-bin PATH] [--ca-bin PATH] [-v]
       nodemeshctl bench --rejudge RESULTS.json [--out DIR]

Brings up a benchmark lab (needs root), runs every scenario - no mesh,
HAProxy mTLS sidecars, nodemesh - over the same workloads in interleaved
rounds, takes the lab down and writes report.md, results.json and SVG
charts to DIR. Methodology: bench/README.md.

--scenarios runs a subset: scenario names or letters a-e, comma-separated
(e.g. --scenarios e: nodemesh L7 and the HAProxy HTTP-mode sidecars), with
the baselines they are measured against.

--profile scale measures one agent against an API server loaded with a
synthetic cluster (1k, 10k, 100k pods; scale:1k,20k picks other points);
scale-smoke is its tiny CI point.

--rejudge recomputes the figures, targets and report of an earlier run
from its results.json with this version's rules, into DIR; it runs
nothing and needs no root.

  nodemeshctl bench worker ...   runs an in-pod benchmark program (internal)
`

func newBenchCmd() *cobra.Command {
	return passthrough("bench", "Benchmark the mesh against no mesh and sidecars on a lab (--profile quick|full --out DIR)", runBench)
}

func runBench(args []string) error {
	if len(args) > 0 && args[0] == "worker" {
		if code := bench.WorkerMain(args[1:], os.Stdout, os.Stderr); code != 0 {
			return exitError(code)
		}
		return nil
	}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, benchUsage) }
	profile := fs.String("profile", "quick", "quick (under 3 minutes), full, scale[:POINTS] or scale-smoke")
	out := fs.String("out", "bench-results", "directory for report.md, results.json and charts")
	dir := fs.String("dir", "/run/nodemesh-bench", "state directory of the benchmark's own lab")
	id := fs.String("id", "", "ID of the benchmark's lab, which names its kernel objects (1-6 lower-case letters or digits; default bench, scale for the scale profiles): another one runs beside a lab of that ID")
	verbose := fs.Bool("v", false, "log every run")
	rejudge := fs.String("rejudge", "", "an earlier run's results.json: recompute its figures, targets and report into --out, run nothing")
	scenarios := fs.String("scenarios", "", "run only these scenarios (names or letters a-e, comma-separated) and their baselines")
	exe, _ := os.Executable()
	agentBin := fs.String("agent-bin", filepath.Join(filepath.Dir(exe), "nodemesh-agent"), "the nodemesh-agent binary (default: next to nodemeshctl)")
	caBin := fs.String("ca-bin", filepath.Join(filepath.Dir(exe), "nodemesh-ca"), "the nodemesh-ca binary (default: next to nodemeshctl)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	if *rejudge != "" {
		res, err := bench.ReadResults(*rejudge)
		if err != nil {
			return err
		}
		if err := bench.Rejudge(res); err != nil {
			return err
		}
		if err := bench.WriteOutput(*out, res); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "wrote %s\n", filepath.Join(*out, "report.md"))
		return nil
	}
	var p bench.Profile
	var sp bench.ScaleProfile
	var err error
	if bench.IsScaleProfile(*profile) {
		sp, err = bench.ScaleProfileByName(*profile)
	} else {
		p, err = bench.ProfileByName(*profile)
	}
	if err != nil {
		return usagef("%s", err)
	}
	var only []string
	if *scenarios != "" {
		if sp.Name != "" {
			return usagef("--scenarios applies to the quick and full profiles, not to %s", *profile)
		}
		only = strings.Split(*scenarios, ",")
		if _, err := bench.SelectScenarios(only); err != nil {
			return usagef("--scenarios: %s", err)
		}
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("the benchmark builds a lab (network namespaces, cgroups): run it as root")
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if sp.Name != "" {
		res, err := bench.RunScale(ctx, bench.ScaleOptions{Profile: sp, StateDir: *dir, ID: cmp.Or(*id, "scale"), AgentBinary: *agentBin, CABinary: *caBin, Log: log,
			ProfileDir: filepath.Join(*out, "profiles")})
		if res != nil {
			if werr := bench.WriteScaleOutput(*out, res); werr != nil {
				return errors.Join(err, werr)
			}
			fmt.Fprintf(os.Stderr, "wrote %s\n", filepath.Join(*out, "report.md"))
		}
		return err
	}
	res, err := bench.Run(ctx, bench.Options{Profile: p, StateDir: *dir, ID: cmp.Or(*id, "bench"), AgentBinary: *agentBin, CABinary: *caBin,
		Scenarios: only, ProfileDir: filepath.Join(*out, "profiles"), Log: log})
	if res != nil {
		if werr := bench.WriteOutput(*out, res); werr != nil {
			return werr
		}
		fmt.Fprintf(os.Stderr, "wrote %s\n", filepath.Join(*out, "report.md"))
	}
	return err
}
