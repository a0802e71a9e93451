// Command nodemeshctl is the nodemesh operator tool. It reads kubeconfig as
// kubectl does and reaches every node's agent through the API server
// (port-forward), so the diagnostic commands (status, workloads, certs,
// connections, exposure, policy explain, routes, check, version) work cluster-wide
// or on one --node from a workstation. On a node, --admin (or
// $NODEMESH_ADMIN) talks to that node's agent directly instead.
//
// `lab` and `bench` build and drive the local multi-node lab, `cluster` a
// real kubelet + containerd cluster on this machine (root only).
// Each command group lives in its own file and is added to the root in
// newRoot.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/nodemesh/nodemesh/cmd/nodemeshctl/internal/cluster"
)

// usageError makes main print the message with a usage hint and exit with
// status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// exitError carries an exit status whose reason was printed already (a
// child's status, failed checks).
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// stdout is where commands write their results (tests replace it).
var stdout io.Writer = os.Stdout

func main() {
	// client-go's port-forward reports broken streams through klog as well
	// as through the error this tool prints: keep klog quiet.
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)
	os.Exit(run(os.Args[1:], os.Stderr))
}

// globals are the flags every cluster command takes.
type globals struct {
	kube  cluster.Options
	admin string
}

// run runs nodemeshctl with args and returns its exit status: 0 success,
// 1 failure (including failed checks), 2 a usage error.
func run(args []string, stderr io.Writer) int {
	g := &globals{}
	root := newRoot(g, stderr)
	root.SetArgs(args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd, err := root.ExecuteContextC(ctx)
	var ue *usageError
	var ee exitError
	name := "nodemeshctl"
	if cmd != nil && cmd != root {
		name = cmd.CommandPath()
	}
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return int(ee)
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "%s: %s\n", name, ue.msg)
		if cmd != nil {
			fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
		}
		return 2
	case strings.HasPrefix(err.Error(), "unknown command"), strings.HasPrefix(err.Error(), "unknown flag"),
		strings.HasPrefix(err.Error(), "unknown shorthand flag"):
		fmt.Fprintf(stderr, "%s: %s\n", name, err)
		return 2
	default:
		fmt.Fprintf(stderr, "%s: %s\n", name, err)
		return 1
	}
}

func newRoot(g *globals, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "nodemeshctl",
		Short: "Operate and debug nodemesh, the sidecarless service mesh",
		Long: `nodemeshctl operates and debugs nodemesh.

The cluster commands read kubeconfig as kubectl does (--kubeconfig,
$KUBECONFIG, ~/.kube/config; --context) and reach each node's agent through
the API server (pods/portforward); they work cluster-wide, or on one node
with --node. On a node, --admin ADDR (or $NODEMESH_ADMIN) asks that node's
agent directly instead.

Exit status: 0 success, 1 failure (including failed checks), 2 usage error.`,
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q", args[0])
			}
			cmd.SetOut(stderr)
			_ = cmd.Usage()
			return exitError(2)
		},
		CompletionOptions: cobra.CompletionOptions{HiddenDefaultCmd: false},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err.Error()} })
	pf := root.PersistentFlags()
	pf.StringVar(&g.kube.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
	pf.StringVar(&g.kube.Context, "context", "", "kubeconfig context (default: the current context)")
	pf.StringVarP(&g.kube.Namespace, "namespace", "n", cluster.DefaultNamespace, "namespace nodemesh is installed in")
	pf.StringVar(&g.admin, "admin", os.Getenv("NODEMESH_ADMIN"), "ask the agent at this admin address directly (on its node: 127.0.0.1:15000) instead of through the API server; default $NODEMESH_ADMIN")
	root.AddGroup(&cobra.Group{ID: "cluster", Title: "Cluster commands:"}, &cobra.Group{ID: "lab", Title: "Lab commands (root, on this machine):"})
	for _, c := range []*cobra.Command{
		newCheckCmd(g), newVersionCmd(g), newStatusCmd(g), newWorkloadsCmd(g), newCertsCmd(g),
		newConnectionsCmd(g), newExposureCmd(g), newPolicyCmd(g), newRoutesCmd(g),
	} {
		c.GroupID = "cluster"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{newLabCmd(), newClusterCmd(), newBenchCmd()} {
		c.GroupID = "lab"
		root.AddCommand(c)
	}
	root.SetHelpCommandGroupID("cluster")
	root.SetCompletionCommandGroupID("cluster")
	return root
}

// passthrough is a command that parses its own arguments (lab, bench):
// cobra hands it everything after its name, --help included.
func passthrough(use, short string, run func(args []string) error) *cobra.Command {
	return &cobra.Command{
		Use:                use,
		Short:              short,
		DisableFlagParsing: true,
		RunE:               func(_ *cobra.Command, args []string) error { return run(args) },
	}
}

// addOutputFlag adds -o to c; formats lists what it accepts (the first is
// the default).
func addOutputFlag(c *cobra.Command, p *string, formats ...string) {
	c.Flags().StringVarP(p, "output", "o", formats[0], "output format: "+strings.Join(formats, ", "))
	_ = c.RegisterFlagCompletionFunc("output", cobra.FixedCompletions(formats, cobra.ShellCompDirectiveNoFileComp))
}

func checkOutput(o string, formats ...string) error {
	for _, f := range formats {
		if o == f {
			return nil
		}
	}
	return usagef("-o %q: want %s", o, strings.Join(formats, ", "))
}
