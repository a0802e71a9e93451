// Package demo runs the nodemesh demo as a list of steps over a lab: the
// lab comes up, each step runs and prints what it shows, the lab goes
// down. Later features add their steps (capture, mTLS, policy) by
// appending to the list that `nodemeshctl lab demo` passes to Run.
package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/spec"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// Env is what a step works with.
type Env struct {
	Lab *lab.Lab
	Out io.Writer
	Log *slog.Logger
}

// Printf writes to the demo's output.
func (e *Env) Printf(format string, args ...any) { fmt.Fprintf(e.Out, format, args...) }

// Step is one part of the demo.
type Step struct {
	Name string
	Run  func(ctx context.Context, env *Env) error
}

// Options configure Run.
type Options struct {
	Spec     *spec.Spec
	Lab      lab.Options
	Keep     bool // leave the lab up at the end
	Out      io.Writer
	Log      *slog.Logger
	StepTime time.Duration // per-step deadline; default 2 minutes
}

// Run brings the lab up, runs steps in order (stopping at the first
// failure) and takes the lab down again unless Keep is set.
func Run(ctx context.Context, opts Options, steps []Step) (err error) {
	out := opts.Out
	if out == nil {
		out = io.Discard
	}
	if opts.StepTime == 0 {
		opts.StepTime = 2 * time.Minute
	}
	if opts.Lab.Log == nil {
		opts.Lab.Log = opts.Log
	}
	fmt.Fprintf(out, "== bringing the lab up (%d nodes, %d pods, %d services)\n", len(opts.Spec.Nodes), len(opts.Spec.Pods), len(opts.Spec.Services))
	start := time.Now()
	l, err := lab.Up(ctx, opts.Spec, opts.Lab)
	if err != nil {
		return fmt.Errorf("bringing the lab up: %w", err)
	}
	fmt.Fprintf(out, "   lab up in %s\n", time.Since(start).Round(10*time.Millisecond))
	defer func() {
		if opts.Keep {
			fmt.Fprintf(out, "== leaving the lab up (state in %s; `nodemeshctl lab down --dir %s` removes it)\n", l.StateDir(), l.StateDir())
			return
		}
		fmt.Fprintln(out, "== tearing the lab down")
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if derr := l.Down(dctx); derr != nil {
			err = errors.Join(err, fmt.Errorf("tearing the lab down: %w", derr))
			return
		}
		left, lerr := lab.Leftovers(l.ID())
		if lerr == nil && len(left) == 0 {
			fmt.Fprintln(out, "   nothing left behind")
		}
	}()
	env := &Env{Lab: l, Out: out, Log: opts.Log}
	for i, s := range steps {
		fmt.Fprintf(out, "== step %d: %s\n", i+1, s.Name)
		sctx, cancel := context.WithTimeout(ctx, opts.StepTime)
		err := s.Run(sctx, env)
		cancel()
		if err != nil {
			return fmt.Errorf("step %d (%s): %w", i+1, s.Name, err)
		}
	}
	fmt.Fprintf(out, "== demo done in %s\n", time.Since(start).Round(10*time.Millisecond))
	return nil
}

// DefaultSteps is the first demo: the lab's inventory, a request between
// pods on different nodes by pod IP, and one through a Service ClusterIP.
func DefaultSteps() []Step {
	return []Step{ShowLab(), CrossNodeRequest("client/client-1", "shop/web-2", 8080), ServiceRequest("client/client-1", "shop/web", "http")}
}

// ShowLab prints nodes, pods and services.
func ShowLab() Step {
	return Step{Name: "what the lab built", Run: func(ctx context.Context, env *Env) error {
		Status(env.Out, env.Lab)
		return nil
	}}
}

// Status writes the lab's nodes, pods and services as tables.
func Status(w io.Writer, l *lab.Lab) {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tIP\tPOD CIDR\tNETNS\tCGROUP")
	for _, n := range l.Nodes() {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.Name, n.IP, n.PodCIDR, n.Netns, n.Cgroup)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tIP\tSTATE\tNETNS\tCGROUP")
	for _, p := range l.Pods() {
		state := "running"
		if !l.PodRunning(p) {
			state = "exited (see " + p.Log + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Key(), p.Node, p.IP, state, p.Netns, p.Cgroup)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tCLUSTER-IP\tPORTS")
	for _, s := range l.Services() {
		var ports []string
		for _, p := range s.Ports {
			ports = append(ports, fmt.Sprintf("%d->%s/%s", p.Port, p.TargetPort.String(), p.Protocol))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", s.Key(), s.ClusterIP, strings.Join(ports, ","))
	}
	tw.Flush()
}

// Get runs the built-in HTTP client in pod from and decodes the reply of
// the built-in HTTP server.
func Get(ctx context.Context, l *lab.Lab, from, url string) (workload.Reply, []byte, error) {
	out, err := l.Exec(ctx, from, []string{"nodemeshctl", "lab", "workload", "get", url})
	if err != nil {
		return workload.Reply{}, out, err
	}
	var r workload.Reply
	if err := json.Unmarshal(out, &r); err != nil {
		return workload.Reply{}, out, fmt.Errorf("decoding the reply from %s: %w: %q", url, err, out)
	}
	return r, out, nil
}

// CrossNodeRequest sends an HTTP request from one pod to another pod's IP
// and shows what the server saw.
func CrossNodeRequest(from, to string, port int) Step {
	return Step{Name: fmt.Sprintf("HTTP from %s to %s by pod IP", from, to), Run: func(ctx context.Context, env *Env) error {
		src, err := env.Lab.Pod(from)
		if err != nil {
			return err
		}
		dst, err := env.Lab.Pod(to)
		if err != nil {
			return err
		}
		url := fmt.Sprintf("http://%s:%d/hello", dst.IP, port)
		env.Printf("   %s (node %s, %s) -> GET %s (%s on node %s)\n", src.Key(), src.Node, src.IP, url, dst.Key(), dst.Node)
		r, _, err := Get(ctx, env.Lab, from, url)
		if err != nil {
			return err
		}
		env.Printf("   answered by %s on node %s; it saw the request come from %s\n", r.Pod, r.Node, r.Remote)
		if r.Pod != dst.Key() {
			return fmt.Errorf("the answer came from %s, not %s", r.Pod, dst.Key())
		}
		return nil
	}}
}

// ServiceRequest sends requests from a pod to a service's ClusterIP and
// shows which endpoints answered.
func ServiceRequest(from, service, portName string) Step {
	return Step{Name: fmt.Sprintf("HTTP from %s to service %s by ClusterIP", from, service), Run: func(ctx context.Context, env *Env) error {
		svc, err := env.Lab.Service(service)
		if err != nil {
			return err
		}
		var port int32
		for _, p := range svc.Ports {
			if p.Name == portName || portName == "" {
				port = p.Port
				break
			}
		}
		if port == 0 {
			return fmt.Errorf("service %s has no port %q", service, portName)
		}
		url := fmt.Sprintf("http://%s:%d/", svc.ClusterIP, port)
		seen := map[string]int{}
		for i := 0; i < 6; i++ {
			r, _, err := Get(ctx, env.Lab, from, url)
			if err != nil {
				return err
			}
			seen[r.Pod+" on "+r.Node]++
		}
		env.Printf("   6 x GET %s from %s, answered by:\n", url, from)
		for k, n := range seen {
			env.Printf("     %-30s %d\n", k, n)
		}
		return nil
	}}
}
