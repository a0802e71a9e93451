package main

// status, workloads, certs and connections read a node agent's admin API
// (127.0.0.1:15000 on the node, so run them there, or through a port
// forward).

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"
)

// adminFlags are the flags every admin command takes.
type adminFlags struct {
	addr   string
	output string
}

func parseAdminFlags(name string, args []string) (*adminFlags, error) {
	f := &adminFlags{}
	fs := flag.NewFlagSet("nodemeshctl "+name, flag.ContinueOnError)
	def := os.Getenv("NODEMESH_ADMIN")
	if def == "" {
		def = "http://127.0.0.1:15000"
	}
	fs.StringVar(&f.addr, "admin", def, "the agent's admin API (default $NODEMESH_ADMIN or http://127.0.0.1:15000)")
	fs.StringVar(&f.output, "o", "table", "output: table or json")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, usagef("unexpected arguments %q", fs.Args())
	}
	if f.output != "table" && f.output != "json" {
		return nil, usagef("-o %q: want table or json", f.output)
	}
	if !strings.Contains(f.addr, "://") {
		f.addr = "http://" + f.addr
	}
	return f, nil
}

// getAdmin fetches path from the admin API into v (and returns the raw body).
func getAdmin(f *adminFlags, path string, v any) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	url := strings.TrimSuffix(f.addr, "/") + path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("building request for %s: %w", url, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reading the agent's admin API (is nodemesh-agent running on this node? set --admin): %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", url, err)
	}
	if resp.StatusCode == http.StatusNotFound {
		return nil, errNotServed
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			return nil, fmt.Errorf("decoding %s: %w", url, err)
		}
	}
	return body, nil
}

var errNotServed = fmt.Errorf("the agent does not serve this (is its data plane off?)")

var stdout io.Writer = os.Stdout

func runStatus(args []string) error {
	f, err := parseAdminFlags("status", args)
	if err != nil {
		return err
	}
	var st struct {
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
	raw, err := getAdmin(f, "/status", &st)
	if err != nil {
		return err
	}
	if f.output == "json" {
		_, err := stdout.Write(raw)
		return err
	}
	ready := "NOT READY"
	if st.Ready {
		ready = "ready"
	}
	fmt.Fprintf(stdout, "agent on node %s: %s (up %s, log level %s)\n", st.Info["node"], ready,
		(time.Duration(st.UptimeSeconds) * time.Second).String(), st.LogLevel)
	for _, k := range []string{"trustDomain", "stateSource", "dataplane"} {
		if v, ok := st.Info[k]; ok {
			fmt.Fprintf(stdout, "  %-12s %s\n", k, v)
		}
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tREADY\tDETAIL")
	for _, c := range st.Checks {
		fmt.Fprintf(tw, "%s\t%t\t%s\n", c.Name, c.Ready, c.Error)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return printRollout(f, stdout)
}

func runWorkloads(args []string) error {
	f, err := parseAdminFlags("workloads", args)
	if err != nil {
		return err
	}
	var pods []struct {
		Namespace string   `json:"namespace"`
		Name      string   `json:"name"`
		IPs       []string `json:"ips"`
		Identity  string   `json:"identity"`
		Enrolled  bool     `json:"enrolled"`
		Phase     string   `json:"phase"`
		Problems  []string `json:"problems"`
	}
	raw, err := getAdmin(f, "/config_dump/workloads", &pods)
	if err != nil {
		return err
	}
	var capture struct {
		Pods []struct {
			Pod     string `json:"pod"`
			Status  string `json:"status"`
			Problem string `json:"problem"`
		} `json:"pods"`
	}
	rawCapture, err := getAdmin(f, "/config_dump/capture", &capture)
	if err != nil && err != errNotServed {
		return err
	}
	if f.output == "json" {
		fmt.Fprintf(stdout, "{\"workloads\": %s, \"capture\": %s}\n", raw, orNull(rawCapture))
		return nil
	}
	status := make(map[string]string)
	for _, p := range capture.Pods {
		s := p.Status
		if p.Problem != "" {
			s += ": " + p.Problem
		}
		status[p.Pod] = s
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tPOD\tIP\tPHASE\tENROLLED\tCAPTURE\tSPIFFE ID")
	for _, p := range pods {
		c := status[p.Namespace+"/"+p.Name]
		if c == "" {
			c = "-"
		}
		if len(p.Problems) > 0 {
			c += " (" + strings.Join(p.Problems, "; ") + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%t\t%s\t%s\n", p.Namespace, p.Name, strings.Join(p.IPs, ","), p.Phase, p.Enrolled, c, p.Identity)
	}
	return tw.Flush()
}

func orNull(b []byte) []byte {
	if len(b) == 0 {
		return []byte("null")
	}
	return b
}

func runCerts(args []string) error {
	f, err := parseAdminFlags("certs", args)
	if err != nil {
		return err
	}
	var certs []struct {
		SPIFFEID string    `json:"spiffeId"`
		NotAfter time.Time `json:"notAfter"`
		Serial   string    `json:"serial"`
		Error    string    `json:"error"`
	}
	raw, err := getAdmin(f, "/config_dump/certificates", &certs)
	if err != nil {
		return err
	}
	if f.output == "json" {
		_, err := stdout.Write(raw)
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SPIFFE ID\tEXPIRES\tIN\tSERIAL\tERROR")
	for _, c := range certs {
		exp, in := "-", "-"
		if !c.NotAfter.IsZero() {
			exp = c.NotAfter.UTC().Format(time.RFC3339)
			in = time.Until(c.NotAfter).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", c.SPIFFEID, exp, in, c.Serial, c.Error)
	}
	return tw.Flush()
}

func runConnections(args []string) error {
	f, err := parseAdminFlags("connections", args)
	if err != nil {
		return err
	}
	var conns []struct {
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
	raw, err := getAdmin(f, "/connections", &conns)
	if err != nil {
		return err
	}
	if f.output == "json" {
		_, err := stdout.Write(raw)
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIRECTION\tTRANSPORT\tPOD\tSRC\tDST\tSRC ID\tDST ID\tSENT\tRECEIVED\tAGE")
	for _, c := range conns {
		dst := c.Dst
		if c.OrigDst != "" && c.OrigDst != c.Dst {
			dst = c.OrigDst + "->" + c.Dst
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", c.Direction, c.Transport, c.Pod, c.Src, dst,
			dash(c.SrcIdentity), dash(c.DstIdentity), c.Sent, c.Received, time.Since(c.Start).Round(time.Second))
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
