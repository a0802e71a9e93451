package main

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

// exposureReport mirrors agent/exposure.Report.
type exposureReport struct {
	Node        string                               `json:"node"`
	Window      string                               `json:"window"`
	Since       time.Time                            `json:"since"`
	ByNamespace map[string]map[string]exposureTotals `json:"byNamespace"`
	Total       map[string]exposureTotals            `json:"total"`
	Top         []exposurePair                       `json:"top"`
	IfStrict    *struct {
		Namespace   string         `json:"namespace"`
		Connections int64          `json:"connections"`
		Bytes       int64          `json:"bytes"`
		Pairs       []exposurePair `json:"pairs"`
	} `json:"ifStrict"`
}

type exposureTotals struct {
	Connections int64 `json:"connections"`
	Bytes       int64 `json:"bytes"`
}

type exposurePair struct {
	Direction   string `json:"direction"`
	Src         string `json:"src"`
	Dst         string `json:"dst"`
	DstEnrolled bool   `json:"dstEnrolled"`
	Connections int64  `json:"connections"`
	Bytes       int64  `json:"bytes"`
}

func newExposureCmd(g *globals) *cobra.Command {
	var node, output, ifStrict string
	var window time.Duration
	var top int
	c := &cobra.Command{
		Use:   "exposure",
		Short: "Plaintext that left or reached enrolled pods over a window; STRICT dry run",
		Long: `exposure prints each agent's exposure ledger: plaintext that left enrolled
pods (destination not meshed) or reached them (PERMISSIVE) over a window,
by direction and namespace, with the top source/destination pairs. With
--if-strict NAMESPACE it also lists the window's plaintext connections to
that namespace's enrolled pods, which a STRICT PeerAuthentication would
have refused.`,
		Example: `  nodemeshctl exposure --window 10m
  nodemeshctl exposure --window 30m --if-strict shop --node node-2`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			if window <= 0 {
				return usagef("--window %s: want a positive duration", window)
			}
			if top < 1 || top > 1000 {
				return usagef("--top %d: want 1 to 1000", top)
			}
			q := url.Values{"window": {window.String()}, "top": {fmt.Sprint(top)}}
			if ifStrict != "" {
				q.Set("if-strict", ifStrict)
			}
			agents, err := g.agents(cmd.Context(), node)
			if err != nil {
				return err
			}
			rs := ask(cmd.Context(), agents, func(ctx context.Context, a agent) (exposureReport, [][]byte, error) {
				var r exposureReport
				raw, err := a.get(ctx, []string{"/exposure?" + q.Encode()}, []any{&r})
				return r, raw, err
			})
			w := cmd.OutOrStdout()
			if output != "table" {
				if err := printStructured(w, output, rs, "exposure"); err != nil {
					return err
				}
				return failures(cmd, rs)
			}
			for i, r := range rs {
				if r.Err != nil {
					continue
				}
				if i > 0 {
					fmt.Fprintln(w)
				}
				printExposure(w, &r.Value)
			}
			return failures(cmd, rs)
		},
	}
	nodeFlag(c, &node)
	addOutputFlag(c, &output, "table", "json", "yaml")
	c.Flags().DurationVar(&window, "window", 10*time.Minute, "report the last WINDOW (at most what the agent keeps, 1h)")
	c.Flags().StringVar(&ifStrict, "if-strict", "", "STRICT dry run: list the window's plaintext connections to enrolled pods of this namespace, which STRICT would refuse")
	c.Flags().IntVar(&top, "top", 10, "how many source/destination pairs to list")
	return c
}

func printExposure(w io.Writer, r *exposureReport) {
	fmt.Fprintf(w, "plaintext exposure on node %s over the last %s (since %s)\n", r.Node, r.Window, r.Since.Format(time.RFC3339))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIRECTION\tNAMESPACE\tCONNECTIONS\tBYTES")
	for _, dir := range []string{"outbound", "inbound"} {
		nss := make([]string, 0, len(r.ByNamespace[dir]))
		for ns := range r.ByNamespace[dir] {
			nss = append(nss, ns)
		}
		slices.Sort(nss)
		for _, ns := range nss {
			t := r.ByNamespace[dir][ns]
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", dir, ns, t.Connections, t.Bytes)
		}
	}
	_ = tw.Flush()
	fmt.Fprintln(w, "(outbound: left an enrolled pod in plaintext, destination not meshed; inbound: reached an enrolled pod in plaintext, PERMISSIVE)")
	fmt.Fprintln(w, "\ntop pairs:")
	printPairs(w, r.Top)
	if r.IfStrict != nil {
		fmt.Fprintf(w, "\nif namespace %s were STRICT: %d connections (%d bytes) in the window would have been refused\n",
			r.IfStrict.Namespace, r.IfStrict.Connections, r.IfStrict.Bytes)
		printPairs(w, r.IfStrict.Pairs)
	}
}

func printPairs(w io.Writer, ps []exposurePair) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIRECTION\tSOURCE\tDESTINATION\tCONNECTIONS\tBYTES")
	for _, p := range ps {
		dst := p.Dst
		if p.DstEnrolled {
			dst += " (enrolled)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\n", p.Direction, p.Src, dst, p.Connections, p.Bytes)
	}
	_ = tw.Flush()
}
