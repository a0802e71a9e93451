// Command nodemeshctl is the nodemesh operator tool. Each command group
// lives in its own file (lab.go, policy.go, ...) and is listed once in the
// table below.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// group is a top-level command: run gets the arguments after its name.
type group struct {
	name    string
	summary string
	run     func(args []string) error
}

// groups is the command table. Add a group with one line here and a file
// cmd/nodemeshctl/<name>.go holding its run function.
var groups = []group{
	{"lab", "build and drive a multi-node cluster on this machine (up, down, status, exec, apply, demo)", runLab},
	{"policy", "explain policy decisions from files", runPolicy},
	{"status", "the node agent's readiness and configuration (admin API)", runStatus},
	{"workloads", "the pods the node agent serves, their enrollment and capture status", runWorkloads},
	{"certs", "the SVIDs the node agent holds and when they expire", runCerts},
	{"connections", "the node agent's open proxied connections", runConnections},
	{"exposure", "plaintext that left or reached enrolled pods over a window (--window 10m, --if-strict NAMESPACE: STRICT dry run)", runExposure},
	{"bench", "benchmark the mesh against no mesh and sidecars on a lab (--profile quick|full --out DIR)", runBench},
}

// usageError makes main print usage hints and exit with status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		printUsage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, g := range groups {
		if g.name != args[0] {
			continue
		}
		err := g.run(args[1:])
		var ue *usageError
		var ee exitError
		switch {
		case err == nil:
			return 0
		case errors.As(err, &ee):
			return int(ee) // the command said why already

		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.As(err, &ue):
			fmt.Fprintf(stderr, "nodemeshctl %s: %s\n", g.name, ue.msg)
			return 2
		default:
			fmt.Fprintf(stderr, "nodemeshctl %s: %s\n", g.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "nodemeshctl: unknown command %q\n", args[0])
	printUsage(stderr)
	return 2
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: nodemeshctl <command> [arguments]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	width := 0
	for _, g := range groups {
		width = max(width, len(g.name))
	}
	for _, g := range groups {
		fmt.Fprintf(w, "  %s%s  %s\n", g.name, strings.Repeat(" ", width-len(g.name)), g.summary)
	}
}
