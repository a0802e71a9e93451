package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	labcluster "github.com/nodemesh/nodemesh/lab/cluster"
)

const clusterUsage = `usage: nodemeshctl cluster <command> [flags]

A real Kubernetes cluster on this machine (root): the lab's API server,
kube-controller-manager, kube-scheduler, and nodes that each run kubelet,
containerd and kube-proxy in namespaces of their own (docs/cluster.md).
It stays up until 'cluster down'.

commands:
  up      [--nodes N] [--images FILE] [--install] [--demo] [-v]
          bring the cluster up; --install imports the images into the nodes
          and applies manifests/overlays/cluster; --demo also starts the
          demo's workloads (lab/cluster/demo.yaml)
  down    remove the cluster and everything it made (also after a crash)
  status  [-o json]  its nodes, API server and kubeconfig

Every command takes --id (default ` + defaultClusterID + `) and --dir (default /var/tmp/nodemesh-ID).
`

// clusterOwnerEnv names a process whose exit makes a cluster brought up by
// `cluster up` stale (lab/cluster Options.Owner): the cluster tests set it
// to themselves, so the next test run sweeps a cluster a killed test left.
const clusterOwnerEnv = "NODEMESH_CLUSTER_OWNER"

// defaultClusterID names the cluster of `nodemeshctl cluster` (its kernel
// objects are nm-mini-...); test clusters are c + 5 random characters.
const defaultClusterID = "mini"

func newClusterCmd() *cobra.Command {
	return passthrough("cluster", "A real kubelet + containerd cluster on this machine (up, down, status)", runCluster)
}

func runCluster(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, clusterUsage)
		if len(args) == 0 {
			return usagef("missing cluster command")
		}
		return nil
	}
	cmds := map[string]func([]string) error{"up": clusterUp, "down": clusterDown, "status": clusterStatus}
	c, ok := cmds[args[0]]
	if !ok {
		fmt.Fprint(os.Stderr, clusterUsage)
		return usagef("unknown cluster command %q", args[0])
	}
	return c(args[1:])
}

// clusterFlags are the flags of every cluster command.
type clusterFlags struct {
	fs      *flag.FlagSet
	id, dir *string
}

func newClusterFlags(name string) clusterFlags {
	fs := flag.NewFlagSet("cluster "+name, flag.ContinueOnError)
	return clusterFlags{
		fs:  fs,
		id:  fs.String("id", defaultClusterID, "cluster ID: 1-6 lower-case letters or digits, naming everything it creates (nm-ID-...)"),
		dir: fs.String("dir", "", "state directory (default /var/tmp/nodemesh-ID)"),
	}
}

// parse parses args and checks what every command needs.
func (f clusterFlags) parse(args []string) error {
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	if f.fs.NArg() > 0 {
		return usagef("%s takes no arguments, got %q", f.fs.Name(), f.fs.Args())
	}
	if *f.dir == "" {
		*f.dir = labcluster.DefaultStateDir(*f.id)
	}
	return needRoot()
}

func clusterUp(args []string) error {
	f := newClusterFlags("up")
	nodes := f.fs.Int("nodes", 2, "worker nodes (1-9)")
	images := f.fs.String("images", "", "image archive to import into every node's containerd (make image writes bin/images.tar); with --install the default is bin/images.tar")
	install := f.fs.Bool("install", false, "install nodemesh: kubectl apply -k the --manifests overlay and wait for the CA and the agents")
	manifests := f.fs.String("manifests", filepath.Join("manifests", "overlays", "cluster"), "the overlay --install applies (its images are tagged dev)")
	demo := f.fs.Bool("demo", false, "also start the demo's workloads and wait until they are Ready (implies --install)")
	verbose := f.fs.Bool("v", false, "log progress")
	if err := f.parse(args); err != nil {
		return err
	}
	*install = *install || *demo
	if *install && *images == "" {
		*images = filepath.Join("bin", "images.tar")
	}
	if *images != "" {
		if _, err := os.Stat(*images); err != nil {
			return fmt.Errorf("the image archive (run make image, or pass --images): %w", err)
		}
	}
	if *install {
		if _, err := os.Stat(filepath.Join(*manifests, "kustomization.yaml")); err != nil {
			return fmt.Errorf("the overlay to install (run from the nodemesh checkout, or pass --manifests): %w", err)
		}
	}
	// Up sweeps whatever has the cluster's ID first: never a cluster
	// that is up.
	if _, err := labcluster.Load(*f.dir); err == nil {
		return fmt.Errorf("cluster %s is up already (%s): nodemeshctl cluster down --id %s first", *f.id, *f.dir, *f.id)
	}
	owner := 0
	if v := os.Getenv(clusterOwnerEnv); v != "" {
		var err error
		if owner, err = strconv.Atoi(v); err != nil || owner <= 0 {
			return fmt.Errorf("$%s=%q: want a process ID", clusterOwnerEnv, v)
		}
	}
	ctx, stop := signalContext()
	defer stop()
	start := time.Now()
	c, err := labcluster.Up(ctx, labcluster.Options{
		ID: *f.id, StateDir: *f.dir, Nodes: *nodes, Images: *images, Detach: true, Owner: owner, Log: logger(*verbose),
	})
	if err != nil {
		return err
	}
	fmt.Printf("cluster %s up with %d node(s) in %s\n", c.ID, len(c.Nodes), time.Since(start).Round(100*time.Millisecond))
	var progress io.Writer = io.Discard
	if *verbose {
		progress = os.Stderr
	}
	leftUp := func(err error) error {
		return fmt.Errorf("%w\nthe cluster stays up: nodemeshctl cluster down --id %s removes it", err, c.ID)
	}
	if *install {
		if err := c.Install(ctx, *manifests, progress); err != nil {
			return leftUp(err)
		}
		fmt.Printf("nodemesh installed (%s): the CA and the agents are Ready\n", *manifests)
	}
	if *demo {
		if err := c.Demo(ctx, progress); err != nil {
			return leftUp(err)
		}
		fmt.Println("demo workloads Ready (namespaces demo and plain)")
	}
	fmt.Println()
	printClusterStatus(os.Stdout, c.Status(ctx))
	fmt.Printf("\nnext:\n  export KUBECONFIG=%s\n  kubectl get pods -A -o wide\n", c.Kubeconfig())
	if *install {
		fmt.Println("  nodemeshctl status")
	}
	if *demo {
		fmt.Println("  kubectl -n demo exec client -- /usr/local/bin/nodemeshctl lab workload get http://$(kubectl -n demo get svc server -o jsonpath='{.spec.clusterIP}')/")
		fmt.Println("  nodemeshctl workloads")
		fmt.Println("  nodemeshctl policy explain --src demo/intruder --dst demo/$(kubectl -n demo get pod -l app=server -o jsonpath='{.items[0].metadata.name}') --port 8080")
	}
	fmt.Printf("  nodemeshctl cluster down --id %s\n", c.ID)
	return nil
}

func clusterDown(args []string) error {
	f := newClusterFlags("down")
	if err := f.parse(args); err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	start := time.Now()
	id := *f.id
	if c, err := labcluster.Load(*f.dir); err == nil {
		id = c.ID
	}
	// Sweep, not Down: it works from the names and pid files alone, also
	// for a cluster whose up never finished.
	if err := labcluster.Sweep(ctx, id, *f.dir); err != nil {
		return err
	}
	left, err := labcluster.Leftovers(id, *f.dir)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("cluster %s: left behind: %q", id, left)
	}
	fmt.Printf("cluster %s down in %s, nothing left\n", id, time.Since(start).Round(10*time.Millisecond))
	return nil
}

func clusterStatus(args []string) error {
	f := newClusterFlags("status")
	format := f.fs.String("o", "text", "output format: text or json")
	if err := f.parse(args); err != nil {
		return err
	}
	if *format != "text" && *format != "json" {
		return usagef("-o %q: want text or json", *format)
	}
	c, err := labcluster.Load(*f.dir)
	if err != nil {
		if _, serr := os.Stat(*f.dir); errors.Is(serr, os.ErrNotExist) {
			return fmt.Errorf("no cluster %s (nothing in %s): nodemeshctl cluster up brings one up", *f.id, *f.dir)
		}
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	st := c.Status(ctx)
	if *format == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printClusterStatus(os.Stdout, st)
	return nil
}

func printClusterStatus(w io.Writer, st labcluster.Status) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tREADY\tIP\tPOD CIDR\tHOSTNAME\tKUBELET\tRUNTIME")
	for _, n := range st.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, n.Ready, n.IP, n.PodCIDR, n.Hostname, n.Kubelet, n.Runtime)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "\ncluster     %s\nAPI server  %s\nkubeconfig  %s\nkubectl     %s\nunderlay    %s (tcpdump -i %s)\nstate       %s\n",
		st.ID, st.APIServer, st.Kubeconfig, st.Kubectl, st.Underlay, st.Underlay, st.StateDir)
}
