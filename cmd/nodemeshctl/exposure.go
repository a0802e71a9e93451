package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
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

// runExposure prints a node agent's exposure ledger: plaintext that left
// or reached enrolled pods over a window, and with --if-strict the
// connections a STRICT PeerAuthentication in that namespace would have
// refused.
func runExposure(args []string) error {
	f := &adminFlags{}
	fs := flag.NewFlagSet("nodemeshctl exposure", flag.ContinueOnError)
	def := os.Getenv("NODEMESH_ADMIN")
	if def == "" {
		def = "http://127.0.0.1:15000"
	}
	fs.StringVar(&f.addr, "admin", def, "the agent's admin API (default $NODEMESH_ADMIN or http://127.0.0.1:15000)")
	fs.StringVar(&f.output, "o", "table", "output: table or json")
	window := fs.Duration("window", 10*time.Minute, "report the last WINDOW (at most what the agent keeps, 1h)")
	ifStrict := fs.String("if-strict", "", "STRICT dry run: list the window's plaintext connections to enrolled pods of this namespace, which STRICT would refuse")
	top := fs.Int("top", 10, "how many source/destination pairs to list")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected arguments %q", fs.Args())
	}
	if f.output != "table" && f.output != "json" {
		return usagef("-o %q: want table or json", f.output)
	}
	if *window <= 0 {
		return usagef("--window %s: want a positive duration", *window)
	}
	if *top < 1 || *top > 1000 {
		return usagef("--top %d: want 1 to 1000", *top)
	}
	if !strings.Contains(f.addr, "://") {
		f.addr = "http://" + f.addr
	}
	q := url.Values{"window": {window.String()}, "top": {fmt.Sprint(*top)}}
	if *ifStrict != "" {
		q.Set("if-strict", *ifStrict)
	}
	var r exposureReport
	raw, err := getAdmin(f, "/exposure?"+q.Encode(), &r)
	if err != nil {
		return err
	}
	if f.output == "json" {
		_, err := stdout.Write(raw)
		return err
	}
	fmt.Fprintf(stdout, "plaintext exposure on node %s over the last %s (since %s)\n", r.Node, r.Window, r.Since.Format(time.RFC3339))
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
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
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "(outbound: left an enrolled pod in plaintext, destination not meshed; inbound: reached an enrolled pod in plaintext, PERMISSIVE)")
	fmt.Fprintln(stdout, "\ntop pairs:")
	printPairs(r.Top)
	if r.IfStrict != nil {
		fmt.Fprintf(stdout, "\nif namespace %s were STRICT: %d connections (%d bytes) in the window would have been refused\n",
			r.IfStrict.Namespace, r.IfStrict.Connections, r.IfStrict.Bytes)
		printPairs(r.IfStrict.Pairs)
	}
	return nil
}

func printPairs(ps []exposurePair) {
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
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
