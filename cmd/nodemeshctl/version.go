package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/nodemesh/nodemesh/agent/version"
	"github.com/nodemesh/nodemesh/cmd/nodemeshctl/internal/cluster"
	"github.com/nodemesh/nodemesh/identity"
)

// componentVersion is one running component's version in `version`.
type componentVersion struct {
	Component string `json:"component"` // client, agent, ca, kubernetes
	Node      string `json:"node,omitempty"`
	Pod       string `json:"pod,omitempty"`
	Version   string `json:"version"`
	Error     string `json:"error,omitempty"`
}

func newVersionCmd(g *globals) *cobra.Command {
	var output string
	var client bool
	c := &cobra.Command{
		Use:   "version",
		Short: "Versions of this client, every agent and CA replica, and the API server",
		Long: `version prints this client's build version, then (unless --client) the
version every agent and CA replica reports and the Kubernetes API server's.
docs/install.md states which version differences are supported.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			vs := []componentVersion{{Component: "client", Version: version.String()}}
			var err error
			if !client {
				vs, err = clusterVersions(cmd.Context(), g, vs)
			}
			w := cmd.OutOrStdout()
			if output != "table" {
				if perr := printValue(w, output, vs); perr != nil {
					return perr
				}
			} else {
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "COMPONENT\tNODE\tPOD\tVERSION")
				for _, v := range vs {
					ver := v.Version
					if v.Error != "" {
						ver = "unknown: " + v.Error
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", v.Component, dash(v.Node), dash(v.Pod), ver)
				}
				if perr := tw.Flush(); perr != nil {
					return perr
				}
			}
			if err != nil {
				return err
			}
			for _, v := range vs {
				if v.Error != "" {
					return exitError(1)
				}
			}
			return nil
		},
	}
	c.Flags().BoolVar(&client, "client", false, "only this client's version (no cluster access)")
	addOutputFlag(c, &output, "table", "json", "yaml")
	return c
}

// clusterVersions appends the API server's, the agents' and the CAs'
// versions to vs.
func clusterVersions(ctx context.Context, g *globals, vs []componentVersion) ([]componentVersion, error) {
	agents, err := g.agents(ctx, "")
	if err != nil {
		return vs, err
	}
	if g.admin == "" {
		cl, err := g.cluster()
		if err != nil {
			return vs, err
		}
		kv := componentVersion{Component: "kubernetes"}
		if sv, err := cl.Client.Discovery().ServerVersion(); err != nil {
			kv.Error = err.Error()
		} else {
			kv.Version = sv.GitVersion
		}
		vs = append(vs, kv)
	}
	rs := ask(ctx, agents, func(ctx context.Context, a agent) (agentStatus, [][]byte, error) {
		var st agentStatus
		raw, err := a.get(ctx, []string{"/status"}, []any{&st})
		return st, raw, err
	})
	for _, r := range rs {
		v := componentVersion{Component: "agent", Node: r.Agent.Node, Pod: r.Agent.Pod, Version: r.Value.Info["version"]}
		if r.Err != nil {
			v.Error = r.Err.Error()
		} else if v.Version == "" {
			v.Version = "unknown (older than version reporting)"
		}
		if v.Node == "" {
			v.Node = r.Value.Info["node"]
		}
		vs = append(vs, v)
	}
	if g.admin != "" {
		return vs, nil
	}
	cl, err := g.cluster()
	if err != nil {
		return vs, err
	}
	cas, err := cl.CAs(ctx)
	if err != nil {
		return vs, err
	}
	for _, p := range cas {
		v := componentVersion{Component: "ca", Node: p.Node, Pod: p.Name}
		var ans struct {
			Version string `json:"version"`
		}
		if err := askCA(ctx, cl, p.Name, identity.VersionPath, &ans); err != nil {
			v.Error = err.Error()
		} else {
			v.Version = ans.Version
		}
		vs = append(vs, v)
	}
	return vs, nil
}

// askCA GETs path from a CA pod's HTTPS port through a port-forward. The
// serving certificate is not verified: only health and version are read,
// and nothing is sent.
func askCA(ctx context.Context, cl *cluster.Cluster, pod, path string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	fwd, err := cl.Forward(ctx, pod, identity.DefaultPort)
	if err != nil {
		return err
	}
	defer fwd.Close()
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}}} //nolint:gosec // read-only health and version
	if _, err := getJSON(ctx, hc, "https://"+fwd.Addr+path, v); err != nil {
		if e := fwd.Errors(); e != "" {
			return fmt.Errorf("%w (port-forward: %s)", err, e)
		}
		return err
	}
	return nil
}
