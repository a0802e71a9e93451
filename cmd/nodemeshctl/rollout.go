package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"
)

// rolloutStatus is the agent's "rollout" config dump (cmd/nodemesh-agent).
type rolloutStatus struct {
	Node   string `json:"node"`
	Synced bool   `json:"synced"`
	Marks  []struct {
		Node      string    `json:"node"`
		Holder    string    `json:"holder"`
		RenewTime time.Time `json:"renewTime"`
		Duration  string    `json:"leaseDuration"`
		Fresh     bool      `json:"meshCapable"`
	} `json:"marks"`
	Unprotected []string `json:"unprotectedPods"`
}

// printRollout adds the partial-rollout section to `nodemeshctl status`:
// node marks (agents not ready or gone) and enrolled pods that are
// unprotected because their node has no ready agent. Agents without an API
// server do not serve it (rs is nil then); that is not an error.
func printRollout(w io.Writer, rs *rolloutStatus) error {
	if rs == nil {
		return nil
	}
	if !rs.Synced {
		fmt.Fprintln(w, "\nnode marks: not synced yet (the agent has not listed the Leases in nodemesh-system)")
		return nil
	}
	fmt.Fprintln(w, "\nnode marks (Leases nodemesh-agent-<node> in nodemesh-system):")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tMESH-CAPABLE\tHOLDER\tLAST RENEWAL")
	for _, m := range rs.Marks {
		state := "yes"
		if !m.Fresh {
			state = "NO (stale: agent not ready or gone)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s ago (lease %s)\n", m.Node, state, dash(m.Holder), time.Since(m.RenewTime).Round(time.Second), m.Duration)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(rs.Unprotected) == 0 {
		fmt.Fprintln(w, "enrolled pods without a ready agent on their node: none")
		return nil
	}
	fmt.Fprintf(w, "enrolled pods without a ready agent on their node (%d; reached in plaintext if PERMISSIVE, refused if STRICT):\n", len(rs.Unprotected))
	for _, p := range rs.Unprotected {
		fmt.Fprintf(w, "  %s\n", p)
	}
	return nil
}
