package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	l7mesh "github.com/nodemesh/nodemesh/agent/l7/mesh"
)

func newRoutesCmd(g *globals) *cobra.Command {
	var node, output string
	c := &cobra.Command{
		Use:   "routes [NAMESPACE/SERVICE]",
		Short: "The HTTPRoutes, GRPCRoutes and TrafficPolicies that apply to Services, and those the agent refused",
		Long: `routes lists, as an agent compiled them, the Gateway API HTTPRoutes and
GRPCRoutes attached to Services (GAMMA) rule by rule - matches, backends,
filters, timeouts, retries - the TrafficPolicy that applies to each
Service, and the routes, rules and TrafficPolicies the agent refused, with
the reason. A refused rule answers its requests with 500; a refused
TrafficPolicy does nothing. Routes of a Service that is not opted in to L7
do nothing either (docs/l7.md).

With NAMESPACE/SERVICE only that Service's routes and policy are listed,
with the refusals of its routes and of its namespace's TrafficPolicies.
Every agent compiles the whole cluster's routes: the agent on --node is
asked, else any agent that answers.`,
		Example: `  nodemeshctl routes
  nodemeshctl routes shop/reviews
  nodemeshctl routes shop/reviews -o yaml`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("want at most one NAMESPACE/SERVICE, got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			var svc string
			if len(args) == 1 {
				svc = args[0]
				if ns, name, ok := strings.Cut(svc, "/"); !ok || ns == "" || name == "" || strings.Contains(name, "/") {
					return usagef("%q: want NAMESPACE/SERVICE", svc)
				}
			}
			agents, err := g.agents(cmd.Context(), node)
			if err != nil {
				return err
			}
			d, from, err := firstDump(cmd.Context(), agents)
			if err != nil {
				return err
			}
			if svc != "" {
				d = d.For(svc)
			}
			w := cmd.OutOrStdout()
			if output != "table" {
				return printValue(w, output, d)
			}
			if from.Node != "" {
				fmt.Fprintf(w, "as compiled by the agent on node %s\n\n", from.Node)
			}
			return printRoutes(w, d, svc)
		},
	}
	nodeFlag(c, &node)
	c.Flags().Lookup("node").Usage = "ask the agent on this node (default: any agent)"
	addOutputFlag(c, &output, "table", "json", "yaml")
	return c
}

// routesDump is an agent's /config_dump/l7.
type routesDump l7mesh.Dump

// firstDump asks the agents in turn for /config_dump/l7 and returns the
// first answer. An agent without the section (no data plane) is skipped.
func firstDump(ctx context.Context, agents []agent) (*routesDump, agent, error) {
	var errs []error
	for _, a := range agents {
		var d routesDump
		_, err := a.get(ctx, []string{"/config_dump/l7"}, []any{&d})
		if err == nil {
			return &d, a, nil
		}
		if errors.Is(err, errNotServed) {
			err = errors.New("the agent has no L7 section (is its data plane off, or is it older than this nodemeshctl?)")
		}
		errs = append(errs, fmt.Errorf("%s: %w", a.label(), err))
	}
	if len(errs) == 0 {
		return nil, agent{}, errors.New("no agent to ask")
	}
	return nil, agent{}, errors.Join(errs...)
}

// For keeps what concerns one Service: its routes and policy, the
// refusals of those routes, and the refused TrafficPolicies of its
// namespace (a TrafficPolicy targets Services of its own namespace).
func (d *routesDump) For(svc string) *routesDump {
	out := &routesDump{Routes: []l7mesh.RouteDump{}, TrafficPolicies: []l7mesh.PolicyDump{}, Refused: []l7mesh.Refusal{},
		MirrorsDropped: d.MirrorsDropped}
	ns, _, _ := strings.Cut(svc, "/")
	routes := map[string]bool{}
	for _, r := range d.Routes {
		if r.Service == svc {
			out.Routes = append(out.Routes, r)
			routes[r.Kind+" "+r.Route] = true
		}
	}
	for _, p := range d.TrafficPolicies {
		if p.Service == svc {
			out.TrafficPolicies = append(out.TrafficPolicies, p)
		}
	}
	for _, f := range d.Refused {
		if routes[f.Kind+" "+f.Object] || f.Kind == "TrafficPolicy" && strings.HasPrefix(f.Object, ns+"/") {
			out.Refused = append(out.Refused, f)
		}
	}
	return out
}

func printRoutes(w io.Writer, d *routesDump, svc string) error {
	if len(d.Routes) == 0 {
		if svc != "" {
			fmt.Fprintf(w, "no HTTPRoute or GRPCRoute is attached to %s: its requests go to the Service itself\n", svc)
		} else {
			fmt.Fprintln(w, "no HTTPRoute or GRPCRoute is attached to a Service")
		}
	} else {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SERVICE\tPORT\tROUTE\tCLIENTS\tRULE\tMATCHES\tBACKENDS\tFILTERS\tSTATUS")
		for _, r := range d.Routes {
			port, clients := "all", "all"
			if r.Port != 0 {
				port = strconv.Itoa(int(r.Port))
			}
			if r.ClientNamespace != "" {
				clients = "ns " + r.ClientNamespace
			}
			for _, ru := range r.Rules {
				rule := strconv.Itoa(ru.Index)
				if ru.Name != "" {
					rule += " (" + ru.Name + ")"
				}
				status := "ok"
				switch {
				case ru.Refused != "":
					status = "REFUSED: " + ru.Refused
				case ru.Warning != "":
					status = "WARNING: " + ru.Warning
				case !r.OptedIn:
					status = "inactive: the Service is not opted in to L7"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s %s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Service, port, r.Kind, r.Route, clients, rule,
					dash(strings.Join(ru.Matches, " | ")), dash(strings.Join(ru.Backends, ", ")), dash(strings.Join(ru.Filters, "; ")), status)
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(d.TrafficPolicies) > 0 {
		fmt.Fprintln(w, "\nTrafficPolicies:")
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SERVICE\tPOLICY\tDOES\tSTATUS")
		for _, p := range d.TrafficPolicies {
			status := "ok"
			if !p.OptedIn {
				status = "inactive: the Service is not opted in to L7"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Service, p.Policy, p.Does, status)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(d.Refused) > 0 {
		fmt.Fprintln(w, "\nRefused (not applied as written):")
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "KIND\tOBJECT\tREASON")
		for _, f := range d.Refused {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", dash(f.Kind), dash(f.Object), f.Reason)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if d.MirrorsDropped > 0 {
		fmt.Fprintf(w, "\nmirrored copies dropped by this agent so far: %d (all slots taken, body over 64 KiB, or the client gone)\n", d.MirrorsDropped)
	}
	return nil
}
