package main

// status, workloads, certs and connections read the agents' admin APIs.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

// agentStatus is the agent's /status (agent/admin.Status).
type agentStatus struct {
	Ready  bool `json:"ready"`
	Checks []struct {
		Name  string `json:"name"`
		Ready bool   `json:"ready"`
		Error string `json:"error"`
	} `json:"checks"`
	Info          map[string]string `json:"info"`
	UptimeSeconds int64             `json:"uptimeSeconds"`
	LogLevel      string            `json:"logLevel"`
}

func (s *agentStatus) failing() []string {
	var out []string
	for _, c := range s.Checks {
		if !c.Ready {
			out = append(out, c.Name+": "+c.Error)
		}
	}
	return out
}

type statusAnswer struct {
	st      agentStatus
	rollout *rolloutStatus
}

func newStatusCmd(g *globals) *cobra.Command {
	var node, output string
	c := &cobra.Command{
		Use:   "status",
		Short: "Agents' readiness, version and configuration; node marks and unprotected pods",
		Long: `status shows every agent's readiness (or the one on --node, in detail):
its readiness checks, version, uptime and log level, and the node marks of
the partial rollout: nodes whose agent is not ready, and enrolled pods left
unprotected because their node has no ready agent.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			agents, err := g.agents(cmd.Context(), node)
			if err != nil {
				return err
			}
			rs := ask(cmd.Context(), agents, func(ctx context.Context, a agent) (statusAnswer, [][]byte, error) {
				var ans statusAnswer
				var rs rolloutStatus
				raw, err := a.get(ctx, []string{"/status", "/config_dump/rollout"}, []any{&ans.st, &rs})
				if errors.Is(err, errNotServed) && len(raw) > 0 && raw[0] != nil {
					return ans, raw[:1], nil // no API server, no node marks
				}
				if err == nil {
					ans.rollout = &rs
				}
				return ans, raw, err
			})
			w := cmd.OutOrStdout()
			if output != "table" {
				if err := printStructured(w, output, rs, "status", "rollout"); err != nil {
					return err
				}
				return failures(cmd, rs)
			}
			if len(rs) == 1 && rs[0].Err == nil {
				if err := printStatusDetail(w, &rs[0].Value.st); err != nil {
					return err
				}
				return printRollout(w, rs[0].Value.rollout)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tPOD\tREADY\tVERSION\tUPTIME\tNOT READY")
			var rollout *rolloutStatus
			for _, r := range rs {
				if r.Err != nil {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Agent.Node, r.Agent.Pod, "unknown", "-", "-", "unreachable (below)")
					continue
				}
				st := r.Value.st
				if rollout == nil && r.Value.rollout != nil && r.Value.rollout.Synced {
					rollout = r.Value.rollout
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Agent.Node, r.Agent.Pod, yesNo(st.Ready), dash(st.Info["version"]),
					(time.Duration(st.UptimeSeconds) * time.Second).String(), dash(strings.Join(st.failing(), "; ")))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if err := printRollout(w, rollout); err != nil {
				return err
			}
			return failures(cmd, rs)
		},
	}
	nodeFlag(c, &node)
	addOutputFlag(c, &output, "table", "json", "yaml")
	return c
}

func printStatusDetail(w io.Writer, st *agentStatus) error {
	ready := "NOT READY"
	if st.Ready {
		ready = "ready"
	}
	fmt.Fprintf(w, "agent on node %s: %s (up %s, log level %s)\n", st.Info["node"], ready,
		(time.Duration(st.UptimeSeconds) * time.Second).String(), st.LogLevel)
	for _, k := range []string{"version", "trustDomain", "stateSource", "dataplane"} {
		if v, ok := st.Info[k]; ok {
			fmt.Fprintf(w, "  %-12s %s\n", k, v)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tREADY\tDETAIL")
	for _, c := range st.Checks {
		fmt.Fprintf(tw, "%s\t%t\t%s\n", c.Name, c.Ready, c.Error)
	}
	return tw.Flush()
}

type workloadInfo struct {
	Namespace string   `json:"namespace"`
	Name      string   `json:"name"`
	IPs       []string `json:"ips"`
	Identity  string   `json:"identity"`
	Enrolled  bool     `json:"enrolled"`
	Phase     string   `json:"phase"`
	Problems  []string `json:"problems"`
}

type captureDump struct {
	Pods []capturedPod `json:"pods"`
}

type capturedPod struct {
	Pod     string `json:"pod"`
	Status  string `json:"status"`
	Problem string `json:"problem"`
}

type workloadsAnswer struct {
	pods    []workloadInfo
	capture captureDump
}

func newWorkloadsCmd(g *globals) *cobra.Command {
	var node, output string
	c := &cobra.Command{
		Use:   "workloads",
		Short: "The pods each agent serves: enrollment, capture status, identity",
		Long: `workloads lists the pods each agent serves (its node's pods): IPs, phase,
whether they are enrolled, their capture status (enrolled, verified, failed:
reason) and their SPIFFE ID.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			agents, err := g.agents(cmd.Context(), node)
			if err != nil {
				return err
			}
			rs := ask(cmd.Context(), agents, func(ctx context.Context, a agent) (workloadsAnswer, [][]byte, error) {
				var ans workloadsAnswer
				raw, err := a.get(ctx, []string{"/config_dump/workloads", "/config_dump/capture"}, []any{&ans.pods, &ans.capture})
				if errors.Is(err, errNotServed) && len(raw) > 0 && raw[0] != nil {
					err = nil // no data plane: no capture section
				}
				return ans, raw, err
			})
			w := cmd.OutOrStdout()
			if output != "table" {
				if err := printStructured(w, output, rs, "workloads", "capture"); err != nil {
					return err
				}
				return failures(cmd, rs)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tNAMESPACE\tPOD\tIP\tPHASE\tENROLLED\tCAPTURE\tSPIFFE ID")
			for _, r := range rs {
				status := make(map[string]string)
				for _, p := range r.Value.capture.Pods {
					s := p.Status
					if p.Problem != "" {
						s += ": " + p.Problem
					}
					status[p.Pod] = s
				}
				for _, p := range r.Value.pods {
					c := dash(status[p.Namespace+"/"+p.Name])
					if len(p.Problems) > 0 {
						c += " (" + strings.Join(p.Problems, "; ") + ")"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%t\t%s\t%s\n", nodeOf(r.Agent), p.Namespace, p.Name, strings.Join(p.IPs, ","), p.Phase, p.Enrolled, c, p.Identity)
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			return failures(cmd, rs)
		},
	}
	nodeFlag(c, &node)
	addOutputFlag(c, &output, "table", "json", "yaml")
	return c
}

type certInfo struct {
	SPIFFEID string    `json:"spiffeId"`
	NotAfter time.Time `json:"notAfter"`
	Serial   string    `json:"serial"`
	Error    string    `json:"error"`
}

func newCertsCmd(g *globals) *cobra.Command {
	var node, output string
	c := &cobra.Command{
		Use:   "certs",
		Short: "The SVIDs each agent holds and when they expire",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			agents, err := g.agents(cmd.Context(), node)
			if err != nil {
				return err
			}
			rs := ask(cmd.Context(), agents, func(ctx context.Context, a agent) ([]certInfo, [][]byte, error) {
				var certs []certInfo
				raw, err := a.get(ctx, []string{"/config_dump/certificates"}, []any{&certs})
				return certs, raw, err
			})
			w := cmd.OutOrStdout()
			if output != "table" {
				if err := printStructured(w, output, rs, "certificates"); err != nil {
					return err
				}
				return failures(cmd, rs)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tSPIFFE ID\tEXPIRES\tIN\tSERIAL\tERROR")
			for _, r := range rs {
				for _, c := range r.Value {
					exp, in := "-", "-"
					if !c.NotAfter.IsZero() {
						exp = c.NotAfter.UTC().Format(time.RFC3339)
						in = time.Until(c.NotAfter).Round(time.Second).String()
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", nodeOf(r.Agent), c.SPIFFEID, exp, in, c.Serial, c.Error)
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			return failures(cmd, rs)
		},
	}
	nodeFlag(c, &node)
	addOutputFlag(c, &output, "table", "json", "yaml")
	return c
}

type connInfo struct {
	Direction   string    `json:"direction"`
	Transport   string    `json:"transport"`
	Pod         string    `json:"pod"`
	Src         string    `json:"src"`
	SrcIdentity string    `json:"srcIdentity"`
	OrigDst     string    `json:"origDst"`
	Dst         string    `json:"dst"`
	DstIdentity string    `json:"dstIdentity"`
	Start       time.Time `json:"start"`
	Sent        int64     `json:"bytesSent"`
	Received    int64     `json:"bytesReceived"`
}

func newConnectionsCmd(g *globals) *cobra.Command {
	var node, output string
	c := &cobra.Command{
		Use:   "connections",
		Short: "The agents' open proxied connections",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			agents, err := g.agents(cmd.Context(), node)
			if err != nil {
				return err
			}
			rs := ask(cmd.Context(), agents, func(ctx context.Context, a agent) ([]connInfo, [][]byte, error) {
				var conns []connInfo
				raw, err := a.get(ctx, []string{"/connections"}, []any{&conns})
				return conns, raw, err
			})
			w := cmd.OutOrStdout()
			if output != "table" {
				if err := printStructured(w, output, rs, "connections"); err != nil {
					return err
				}
				return failures(cmd, rs)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tDIRECTION\tTRANSPORT\tPOD\tSRC\tDST\tSRC ID\tDST ID\tSENT\tRECEIVED\tAGE")
			for _, r := range rs {
				for _, c := range r.Value {
					dst := c.Dst
					if c.OrigDst != "" && c.OrigDst != c.Dst {
						dst = c.OrigDst + "->" + c.Dst
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", nodeOf(r.Agent), c.Direction, c.Transport, c.Pod, c.Src, dst,
						dash(c.SrcIdentity), dash(c.DstIdentity), c.Sent, c.Received, time.Since(c.Start).Round(time.Second))
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			return failures(cmd, rs)
		},
	}
	nodeFlag(c, &node)
	addOutputFlag(c, &output, "table", "json", "yaml")
	return c
}

// nodeOf names the agent's node in tables ("-" with --admin: the agent's
// own node is in `status`).
func nodeOf(a agent) string { return dash(a.Node) }

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "NO"
}
