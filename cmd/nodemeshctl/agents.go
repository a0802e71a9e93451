package main

// Reaching agents: either one agent's admin API given with --admin (on its
// node), or every agent (or the one on --node) through the API server.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/cmd/nodemeshctl/internal/cluster"
)

// AdminPort is the agent's admin API port, on its node's loopback.
const AdminPort = 15000

// agent is one agent to ask: its node and pod (empty with --admin) and how
// to reach its admin API.
type agent struct {
	Node string
	Pod  string
	g    *globals
	c    *cluster.Cluster
}

// nodeFlag adds --node to c.
func nodeFlag(c *cobra.Command, p *string) {
	c.Flags().StringVar(p, "node", "", "only the agent on this node (default: every agent in the cluster)")
}

// agents returns the agents a command asks: the one at --admin, the one on
// node, or all of them.
func (g *globals) agents(ctx context.Context, node string) ([]agent, error) {
	if g.admin != "" {
		if node != "" {
			return nil, usagef("--node and --admin exclude each other (--admin is one node's agent already)")
		}
		return []agent{{g: g}}, nil
	}
	c, err := g.cluster()
	if err != nil {
		return nil, err
	}
	pods, err := c.Agents(ctx, node)
	if err != nil {
		return nil, err
	}
	out := make([]agent, 0, len(pods))
	for _, p := range pods {
		out = append(out, agent{Node: p.Node, Pod: p.Name, g: g, c: c})
	}
	return out, nil
}

func (g *globals) cluster() (*cluster.Cluster, error) {
	return cluster.Connect(g.kube)
}

// errNotServed: the agent answered 404 (a section its configuration does
// not have, such as capture on an agent without a data plane).
var errNotServed = errors.New("the agent does not serve this (is its data plane off?)")

// get fetches each path from the agent's admin API and decodes the JSON
// answers into vs (nil entries are skipped). One port-forward serves all
// paths. Each raw body is returned (nil for a path the agent does not
// serve; the error is then errNotServed, after every other path was read).
func (a agent) get(ctx context.Context, paths []string, vs []any) ([][]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	base := a.g.admin
	var fwd *cluster.Forward
	if a.c != nil {
		var err error
		fwd, err = a.c.Forward(ctx, a.Pod, AdminPort)
		if err != nil {
			return nil, err
		}
		defer fwd.Close()
		base = fwd.Addr
	}
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: a.c != nil}}
	defer hc.CloseIdleConnections()
	raws := make([][]byte, len(paths))
	var notServed error
	for i, p := range paths {
		var v any
		if i < len(vs) {
			v = vs[i]
		}
		raw, err := getJSON(ctx, hc, strings.TrimSuffix(base, "/")+p, v)
		if errors.Is(err, errNotServed) {
			notServed = err // the rest may be served
			continue
		}
		if err != nil {
			if fwd != nil {
				if e := fwd.Errors(); e != "" {
					err = fmt.Errorf("%w (port-forward: %s)", err, e)
				}
			}
			return raws, err
		}
		raws[i] = raw
	}
	return raws, notServed
}

func getJSON(ctx context.Context, hc *http.Client, url string, v any) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("building request for %s: %w", url, err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reading the agent's admin API (is nodemesh-agent running there? on a node, set --admin): %w", err)
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

// label names the agent in messages.
func (a agent) label() string {
	if a.Node == "" {
		return "the agent at " + a.g.admin
	}
	return "agent on node " + a.Node
}

// result is one agent's answer in a cluster-wide command.
type result[T any] struct {
	Agent agent
	Value T
	Raw   [][]byte
	Err   error
}

// maxParallel bounds concurrent port-forwards in cluster-wide commands.
const maxParallel = 8

// ask runs fn against every agent, at most maxParallel at a time, and
// returns the answers in the agents' order.
func ask[T any](ctx context.Context, agents []agent, fn func(ctx context.Context, a agent) (T, [][]byte, error)) []result[T] {
	out := make([]result[T], len(agents))
	sem := make(chan struct{}, maxParallel)
	var wg sync.WaitGroup
	for i, a := range agents {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			v, raw, err := fn(ctx, a)
			out[i] = result[T]{Agent: a, Value: v, Raw: raw, Err: err}
		})
	}
	wg.Wait()
	return out
}

// failures prints each failed agent's error to stderr and returns an error
// when any failed (exit status 1), after the others' answers were shown.
func failures[T any](cmd *cobra.Command, rs []result[T]) error {
	n := 0
	for _, r := range rs {
		if r.Err != nil {
			n++
			fmt.Fprintf(cmd.ErrOrStderr(), "%s: %s\n", r.Agent.label(), r.Err)
		}
	}
	switch {
	case n == 0:
		return nil
	case len(rs) == 1:
		return exitError(1)
	}
	return fmt.Errorf("%d of %d agents failed", n, len(rs))
}

// perAgent is one agent's entry in -o json|yaml: the node and pod, and the
// agent's answers by section (or its error).
type perAgent struct {
	Node  string                     `json:"node,omitempty"`
	Pod   string                     `json:"pod,omitempty"`
	Error string                     `json:"error,omitempty"`
	Data  map[string]json.RawMessage `json:"-"`
}

// MarshalJSON flattens Data next to node and pod.
func (p perAgent) MarshalJSON() ([]byte, error) {
	m := make(map[string]any, len(p.Data)+3)
	for k, v := range p.Data {
		m[k] = v
	}
	if p.Node != "" {
		m["node"] = p.Node
	}
	if p.Pod != "" {
		m["pod"] = p.Pod
	}
	if p.Error != "" {
		m["error"] = p.Error
	}
	return json.Marshal(m)
}

// printStructured writes rs as a JSON or YAML list, one entry per agent,
// with the agent's raw answers under names (sections[i] for Raw[i]).
func printStructured[T any](w io.Writer, format string, rs []result[T], sections ...string) error {
	list := make([]perAgent, 0, len(rs))
	for _, r := range rs {
		e := perAgent{Node: r.Agent.Node, Pod: r.Agent.Pod, Data: map[string]json.RawMessage{}}
		if r.Err != nil {
			e.Error = r.Err.Error()
		}
		for i, s := range sections {
			if i < len(r.Raw) && len(r.Raw[i]) > 0 {
				e.Data[s] = json.RawMessage(r.Raw[i])
			}
		}
		list = append(list, e)
	}
	return printValue(w, format, list)
}

// printValue writes v as indented JSON or as YAML.
func printValue(w io.Writer, format string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding JSON: %w", err)
	}
	if format == "yaml" {
		if b, err = yaml.JSONToYAML(b); err != nil {
			return fmt.Errorf("encoding YAML: %w", err)
		}
		_, err = w.Write(b)
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}
