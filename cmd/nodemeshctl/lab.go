package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/examples"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/spec"
	"github.com/nodemesh/nodemesh/lab/workload"
)

const labUsage = `usage: nodemeshctl lab <command> [flags]

commands:
  up      [-f SPEC]           build the lab (default spec: the two-node example)
  down    [--all]             remove the lab (works after a crash; --all: every lab)
  status  [-o json]           nodes, pods, services and the kubeconfig path
  exec    POD -- ARGV...      run ARGV in a pod (POD is namespace/name); --node NODE runs it in a node
  apply   -f SPEC             change pods, services and namespaces of the running lab
  demo    [-f SPEC] [--keep]  bring the lab up, show it, make requests, tear it down
  workload NAME ...           the built-in pod programs (http, tcp-echo, get, tcp, sleep)

Every command takes --dir (the state directory; default $` + lab.StateDirEnv + ` or ` + lab.DefaultStateDir + `).
`

func newLabCmd() *cobra.Command {
	return passthrough("lab", "Build and drive a multi-node cluster on this machine (up, down, status, exec, apply, demo, workload)", runLab)
}

func runLab(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, labUsage)
		if len(args) == 0 {
			return usagef("missing lab command")
		}
		return nil
	}
	cmds := map[string]func([]string) error{
		"up": labUp, "down": labDown, "status": labStatus, "exec": labExec,
		"apply": labApply, "demo": labDemo,
		"workload": func(a []string) error {
			ctx, stop := signalContext()
			defer stop()
			if code := workload.Main(ctx, a, os.Stdout, os.Stderr); code != 0 {
				return exitError(code)
			}
			return nil
		},
	}
	c, ok := cmds[args[0]]
	if !ok {
		fmt.Fprint(os.Stderr, labUsage)
		return usagef("unknown lab command %q", args[0])
	}
	return c(args[1:])
}

func defaultDir() string {
	if d := os.Getenv(lab.StateDirEnv); d != "" {
		return d
	}
	return lab.DefaultStateDir
}

func newFlags(name string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet("lab "+name, flag.ContinueOnError)
	dir := fs.String("dir", defaultDir(), "lab state directory")
	return fs, dir
}

func needRoot() error {
	if os.Geteuid() != 0 {
		return lab.ErrNotRoot
	}
	return nil
}

func loadSpec(path string) (*spec.Spec, error) {
	if path == "" {
		return examples.TwoNodesSpec()
	}
	return spec.Load(path)
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func logger(verbose bool) *slog.Logger {
	lvl := slog.LevelWarn
	if verbose {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

func labUp(args []string) error {
	fs, dir := newFlags("up")
	file := fs.String("f", "", "lab spec file (default: the built-in two-node example, "+examples.TwoNodesFile+")")
	id := fs.String("id", "", "lab ID naming its kernel objects (default: from --dir)")
	verbose := fs.Bool("v", false, "log progress")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("up takes no arguments, got %q", fs.Args())
	}
	if err := needRoot(); err != nil {
		return err
	}
	sp, err := loadSpec(*file)
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	name := *file
	if name == "" {
		name = examples.TwoNodesFile
	}
	l, err := lab.Up(ctx, sp, lab.Options{StateDir: *dir, ID: *id, SpecFile: name, Log: logger(*verbose)})
	if err != nil {
		return err
	}
	printStatus(os.Stdout, l)
	fmt.Printf("\nlab %s up in %s\n", l.ID(), l.StartupTime().Round(10*time.Millisecond))
	return nil
}

func labDown(args []string) error {
	fs, dir := newFlags("down")
	all := fs.Bool("all", false, "remove every lab on this machine (everything named "+lab.Prefix+"*)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := needRoot(); err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	start := time.Now()
	if *all {
		if err := lab.SweepAll(ctx); err != nil {
			return err
		}
	} else if err := lab.Down(ctx, *dir); err != nil {
		return err
	}
	fmt.Printf("lab down in %s, nothing left\n", time.Since(start).Round(10*time.Millisecond))
	return nil
}

func labStatus(args []string) error {
	fs, dir := newFlags("status")
	format := fs.String("o", "text", "output format: text or json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := needRoot(); err != nil {
		return err
	}
	l, err := lab.Load(*dir)
	if err != nil {
		return err
	}
	switch *format {
	case "text":
		printStatus(os.Stdout, l)
	case "json":
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{
			"id": l.ID(), "stateDir": l.StateDir(), "kubeconfig": l.Kubeconfig(), "apiServer": l.Server.URL,
			"nodes": l.Nodes(), "pods": l.Pods(), "services": l.Services(), "processes": l.Processes(),
		})
	default:
		return usagef("-o %q: want text or json", *format)
	}
	return nil
}

func printStatus(w io.Writer, l *lab.Lab) {
	demo.Status(w, l)
	if ps := l.Processes(); len(ps) > 0 {
		fmt.Fprintln(w)
		for _, p := range ps {
			state := "running"
			if !l.Running(p) {
				state = "exited"
			}
			fmt.Fprintf(w, "node process %s/%s pid %d %s (log %s)\n", p.Node, p.Name, p.Pid, state, p.Log)
		}
	}
	fmt.Fprintf(w, "\nAPI server  %s\nkubeconfig  %s   (also valid inside every node's network namespace)\nstate       %s\n", l.Server.URL, l.Kubeconfig(), l.StateDir())
}

func labExec(args []string) error {
	fs, dir := newFlags("exec")
	node := fs.String("node", "", "run in this node's network namespace instead of a pod's")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	var target string
	if *node == "" {
		if len(rest) == 0 {
			return usagef("exec: name a pod: nodemeshctl lab exec NAMESPACE/POD -- ARGV...")
		}
		target, rest = rest[0], rest[1:]
	}
	if len(rest) > 0 && rest[0] == "--" {
		rest = rest[1:]
	}
	if len(rest) == 0 {
		return usagef("exec: give the command after --")
	}
	if err := needRoot(); err != nil {
		return err
	}
	l, err := lab.Load(*dir)
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	if *node != "" {
		err = l.ExecNodeStream(ctx, *node, rest, os.Stdin, os.Stdout, os.Stderr)
	} else {
		err = l.ExecStream(ctx, target, rest, os.Stdin, os.Stdout, os.Stderr)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() > 0 {
		return exitError(ee.ExitCode()) // the command's own status, as kubectl exec does
	}
	return err
}

func labApply(args []string) error {
	fs, dir := newFlags("apply")
	file := fs.String("f", "", "lab spec file (required)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *file == "" {
		return usagef("apply: -f SPEC is required")
	}
	if err := needRoot(); err != nil {
		return err
	}
	sp, err := spec.Load(*file)
	if err != nil {
		return err
	}
	l, err := lab.Load(*dir)
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	start := time.Now()
	if err := l.Apply(ctx, sp); err != nil {
		return err
	}
	printStatus(os.Stdout, l)
	fmt.Printf("\napplied %s in %s\n", *file, time.Since(start).Round(10*time.Millisecond))
	return nil
}

func labDemo(args []string) error {
	fs := flag.NewFlagSet("lab demo", flag.ContinueOnError)
	// The demo has its own lab, so it never sweeps one a user keeps up.
	dir := fs.String("dir", "/run/nodemesh-demo", "lab state directory of the demo")
	file := fs.String("f", "", "lab spec file (default: the mesh demo's, "+demo.MeshSpecFile+")")
	keep := fs.Bool("keep", false, "leave the lab up at the end")
	verbose := fs.Bool("v", false, "log progress")
	agentBin := fs.String("agent-bin", "", "nodemesh-agent binary (default: next to this executable, where 'make build' puts it)")
	caBin := fs.String("ca-bin", "", "nodemesh-ca binary (default: next to this executable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := needRoot(); err != nil {
		return err
	}
	agent, ca, err := mesh.FindBinaries(*agentBin, *caBin)
	if err != nil {
		return err
	}
	var sp *spec.Spec
	if *file == "" {
		sp, err = demo.MeshSpec()
	} else {
		sp, err = loadSpec(*file)
	}
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	err = demo.Run(ctx, demo.Options{
		Spec: sp, Keep: *keep, Out: os.Stdout, Log: logger(*verbose),
		Lab: lab.Options{StateDir: *dir, SpecFile: *file},
	}, demoSteps(demo.MeshOptions{AgentBinary: agent, CABinary: ca}))
	if errors.Is(err, context.Canceled) {
		return errors.New("interrupted")
	}
	return err
}

// demoSteps lists the demo: the lab, then the mesh in it (see
// demo.MeshSteps), then the mesh stopping; the lab goes down after.
func demoSteps(o demo.MeshOptions) []demo.Step {
	return demo.MeshSteps(o)
}
