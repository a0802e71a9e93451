package main

import (
	"flag"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/agent/policy/explain"
)

func newPolicyCmd(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "policy",
		Short: "Explain policy decisions, live from an agent or offline from YAML",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usagef("missing subcommand (want explain)")
		},
	}
	c.AddCommand(newExplainCmd(g))
	return c
}

func newExplainCmd(g *globals) *cobra.Command {
	var node string
	fs := flag.NewFlagSet("explain", flag.ContinueOnError)
	opts := explain.Register(fs)
	c := &cobra.Command{
		Use:   "explain --src SRC --dst DST --port PORT [--node NODE | --from-files DIR | --agent URL]",
		Short: "Why a connection is allowed or denied: verdict, deciding direction, policy and rule",
		Long: `explain says whether a connection is allowed by NetworkPolicy,
AuthorizationPolicy and the mTLS mode, which direction decided, and which
policy and rule.

Live (the default) it asks an agent, which answers from the snapshot it
enforces: the agent on --node, else the agent on the source pod's node, else
any agent (each agent's snapshot holds the whole cluster's policy). --agent
URL asks an admin API directly; --from-files DIR evaluates Kubernetes YAML
offline (Namespaces, Pods, Nodes, NetworkPolicies, AuthorizationPolicies,
PeerAuthentications; other kinds are ignored; searched recursively).

SRC and DST are namespace/pod or an IP address. By default the connection is
taken to be mTLS (HBONE) with the source pod's SPIFFE ID when both pods are
enrolled in the mesh, plaintext otherwise; --principal and --plaintext
override that.

With --method, --path, --host or --header it explains one HTTP request: when
the destination port is handled at L7 (a Service that opted in targets it),
the request is normalised as the destination agent does it and decided on
its own, and the answer names the rule that decided and whether the agent
answers 403 or 400; otherwise it says that the request's fields are never
checked there (docs/l7.md).`,
		Example: `  nodemeshctl policy explain --src shop/frontend --dst shop/backend --port 8080
  nodemeshctl policy explain --src shop/frontend --dst shop/backend --port 8080 --method DELETE --path /api/items --host backend
  nodemeshctl policy explain --from-files ./cluster --src legacy/client --dst shop/backend --port 8080 -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := opts.Validate(); err != nil {
				return usagef("%s", strings.TrimPrefix(err.Error(), "explain: "))
			}
			if opts.FromFiles() != "" || opts.Agent() != "" {
				if node != "" {
					return usagef("--node asks a live agent: drop --from-files or --agent")
				}
				return opts.Run(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr())
			}
			if g.admin != "" {
				opts.SetAgent(adminURL(g.admin))
				return opts.Run(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr())
			}
			cl, err := g.cluster()
			if err != nil {
				return err
			}
			if node == "" {
				// The source pod's agent enforces egress and sees what it sees.
				if ns, name, ok := strings.Cut(opts.Src(), "/"); ok {
					p, err := cl.Client.CoreV1().Pods(ns).Get(cmd.Context(), name, metav1.GetOptions{})
					if err == nil {
						node = p.Spec.NodeName
					}
				}
			}
			agents, err := cl.Agents(cmd.Context(), node)
			if err != nil && node != "" && !cmd.Flags().Changed("node") {
				agents, err = cl.Agents(cmd.Context(), "") // no agent on the source's node: any
			}
			if err != nil {
				return err
			}
			a := agents[0]
			for _, x := range agents {
				if x.Ready {
					a = x
					break
				}
			}
			fwd, err := cl.Forward(cmd.Context(), a.Name, AdminPort)
			if err != nil {
				return err
			}
			defer fwd.Close()
			opts.SetAgent("http://" + fwd.Addr)
			if err := opts.Run(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr()); err != nil {
				return fmt.Errorf("asking the agent on node %s: %w", a.Node, err)
			}
			return nil
		},
	}
	c.Flags().AddGoFlagSet(fs)
	nodeFlag(c, &node)
	c.Flags().Lookup("node").Usage = "ask the agent on this node (default: the source pod's node, else any agent)"
	_ = c.RegisterFlagCompletionFunc("o", cobra.FixedCompletions([]string{"text", "json", "yaml"}, cobra.ShellCompDirectiveNoFileComp))
	return c
}

// adminURL turns host:port into a URL.
func adminURL(addr string) string {
	if strings.Contains(addr, "://") {
		return addr
	}
	return "http://" + addr
}
