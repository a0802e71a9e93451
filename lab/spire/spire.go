// Package spire runs a real SPIRE deployment in a lab, for the agents'
// --identity-source=spiffe-workload-api: one spire-server (sqlite
// datastore, in-memory keys) as a process of one node, and one spire-agent
// per node, attested with a join token and serving the Workload API on a
// unix socket with the unix workload attestor. Registration entries are
// created and deleted with the spire-server CLI, as an operator would.
//
// Every process is a lab node process (lab.StartNodeProcess), and every
// file (configuration, datastore, sockets, logs) lives under the lab's
// state directory, so Stop, the lab's Down, and the sweep of a crashed
// test's lab (labtest.SweepStale) remove all of it.
//
// The binaries are SPIRE's own, built from the Go module proxy by
// `make spire` (Version) into the user cache; BinDir finds them.
package spire

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/lab"
)

// Version is the SPIRE release `make spire` builds (keep the Makefile's
// SPIRE_VERSION equal).
const Version = "v1.13.3"

// BinDirEnv overrides where spire-server and spire-agent are taken from
// (make sets it to the cache directory it builds into).
const BinDirEnv = "NODEMESH_SPIRE_DIR"

// Names of the lab node processes Start creates.
const (
	ServerProcess = "spire-server"
	AgentProcess  = "spire-agent"
)

// ServerPort is the SPIRE server's port on its node's address.
const ServerPort = 8081

// maxSocketPath is the room for a unix socket path (sun_path, with its
// terminating NUL).
const maxSocketPath = 107

// CacheDir is where `make spire` puts the build of Version.
func CacheDir() (string, error) {
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("finding the user cache directory: %w", err)
	}
	return filepath.Join(dir, "nodemesh", "spire-"+Version), nil
}

// BinDir returns the directory holding spire-server and spire-agent:
// $NODEMESH_SPIRE_DIR if set, else CacheDir. It does not build them.
func BinDir() (string, error) {
	dir, from := os.Getenv(BinDirEnv), BinDirEnv
	if dir == "" {
		d, err := CacheDir()
		if err != nil {
			return "", err
		}
		dir, from = d, "the cache"
	}
	for _, b := range []string{ServerProcess, AgentProcess} {
		p := filepath.Join(dir, b)
		fi, err := os.Stat(p)
		if err != nil {
			return "", fmt.Errorf("SPIRE %s from %s: %w (run `make spire`, which builds spire-server and spire-agent from the Go module proxy into %s, or set %s)", Version, from, err, dir, BinDirEnv)
		}
		if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return "", fmt.Errorf("SPIRE %s: %s is not an executable file", Version, p)
		}
	}
	return dir, nil
}

// Options configure Start.
type Options struct {
	// BinDir holds spire-server and spire-agent; "" = BinDir().
	BinDir string
	// TrustDomain is SPIRE's trust domain; default the mesh's default
	// (identity.DefaultTrustDomain), which the lab's agents use.
	TrustDomain spiffeid.TrustDomain
	// ServerNode runs the server; default the lab's first node.
	ServerNode string
	// Nodes get an agent each; nil = every node of the lab.
	Nodes []string
	// Wait bounds how long Start waits for the server and each agent to
	// be healthy; default 1m.
	Wait time.Duration
	Log  *slog.Logger // progress; nil discards
}

// SPIRE is a running SPIRE server with its agents.
type SPIRE struct {
	lab        *lab.Lab
	log        *slog.Logger
	dir        string // everything SPIRE writes
	serverBin  string
	agentBin   string
	td         spiffeid.TrustDomain
	ServerNode string
	ServerAddr string // node-ip:port
	ServerLog  string
	// serverSock is the server's admin API (the CLI's -socketPath).
	serverSock string
	Agents     map[string]*Agent // by node
}

// Agent is one node's SPIRE agent.
type Agent struct {
	Node string
	// ID is the agent's SPIFFE ID (join token attestation): the parent of
	// the registration entries of workloads on its node.
	ID spiffeid.ID
	// Socket is its Workload API socket (a path).
	Socket string
	Pid    int
	Log    string
}

// Addr is the Workload API address for --spiffe-endpoint-socket.
func (a *Agent) Addr() string { return "unix://" + a.Socket }

// Start runs the server on o.ServerNode and an agent on each node, and
// waits until all are healthy. On error everything started is stopped and
// its files removed.
func Start(ctx context.Context, l *lab.Lab, o Options) (_ *SPIRE, err error) {
	if o.BinDir == "" {
		if o.BinDir, err = BinDir(); err != nil {
			return nil, err
		}
	}
	if o.TrustDomain.IsZero() {
		o.TrustDomain = spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain)
	}
	if o.Wait <= 0 {
		o.Wait = time.Minute
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	nodes := l.Nodes()
	if len(nodes) == 0 {
		return nil, errors.New("starting SPIRE: the lab has no nodes")
	}
	if o.ServerNode == "" {
		o.ServerNode = nodes[0].Name
	}
	server, err := l.Node(o.ServerNode)
	if err != nil {
		return nil, fmt.Errorf("starting SPIRE: %w", err)
	}
	if o.Nodes == nil {
		for _, n := range nodes {
			o.Nodes = append(o.Nodes, n.Name)
		}
	}
	dir := filepath.Join(l.StateDir(), "spire")
	s := &SPIRE{lab: l, log: o.Log, dir: dir, td: o.TrustDomain,
		serverBin: filepath.Join(o.BinDir, ServerProcess), agentBin: filepath.Join(o.BinDir, AgentProcess),
		ServerNode: server.Name, ServerAddr: net.JoinHostPort(server.IP, fmt.Sprint(ServerPort)),
		serverSock: filepath.Join(dir, "server", "api.sock"), Agents: map[string]*Agent{}}
	if len(s.serverSock) > maxSocketPath || len(filepath.Join(dir, "agent-"+strings.Repeat("x", 40), "api.sock")) > maxSocketPath {
		return nil, fmt.Errorf("starting SPIRE: the lab's state directory %s is too long for unix socket paths under it", l.StateDir())
	}
	if _, err := os.Stat(dir); err == nil {
		return nil, fmt.Errorf("starting SPIRE: %s exists: SPIRE already runs in this lab (Stop it first)", dir)
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, s.logTails())
			_ = s.Stop(context.WithoutCancel(ctx))
		}
	}()
	wctx, cancel := context.WithTimeout(ctx, o.Wait)
	defer cancel()
	if err := s.startServer(wctx); err != nil {
		return nil, err
	}
	bundle, err := s.cli(wctx, "bundle", "show", "-format", "pem")
	if err != nil {
		return nil, fmt.Errorf("reading the SPIRE server's bundle: %w", err)
	}
	bundlePath := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundlePath, bundle, 0o644); err != nil {
		return nil, fmt.Errorf("writing the SPIRE bundle: %w", err)
	}
	for _, node := range o.Nodes {
		if err := s.startAgent(wctx, node, bundlePath); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func (s *SPIRE) startServer(ctx context.Context) error {
	d := filepath.Join(s.dir, "server")
	if err := os.MkdirAll(d, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", d, err)
	}
	host, port, _ := net.SplitHostPort(s.ServerAddr)
	conf := fmt.Sprintf(`server {
  bind_address = %q
  bind_port = %q
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "INFO"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
}

plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  KeyManager "memory" {
    plugin_data {}
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
`, host, port, s.serverSock, s.td.Name(), d, filepath.Join(d, "datastore.sqlite3"))
	path := filepath.Join(d, "server.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return fmt.Errorf("writing the SPIRE server configuration: %w", err)
	}
	p, err := s.lab.StartNodeProcess(ctx, s.ServerNode, ServerProcess, []string{s.serverBin, "run", "-config", path}, nil)
	if err != nil {
		return fmt.Errorf("starting spire-server on %s: %w", s.ServerNode, err)
	}
	s.ServerLog = p.Log
	s.log.Info("SPIRE server started", "node", s.ServerNode, "addr", s.ServerAddr, "pid", p.Pid)
	return s.waitHealthy(ctx, "spire-server", p, func(ctx context.Context) error {
		_, err := s.cli(ctx, "healthcheck")
		return err
	})
}

func (s *SPIRE) startAgent(ctx context.Context, node, bundlePath string) error {
	d := filepath.Join(s.dir, "agent-"+node)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", d, err)
	}
	out, err := s.cli(ctx, "token", "generate", "-ttl", "600", "-output", "json")
	if err != nil {
		return fmt.Errorf("generating the join token of %s's SPIRE agent: %w", node, err)
	}
	var tok struct {
		Value string `json:"value"`
	}
	if err := json.Unmarshal(out, &tok); err != nil || tok.Value == "" {
		return fmt.Errorf("reading the join token of %s's SPIRE agent from %q: %v", node, out, err)
	}
	id, err := spiffeid.FromPathf(s.td, "/spire/agent/join_token/%s", tok.Value)
	if err != nil {
		return fmt.Errorf("the SPIFFE ID of %s's SPIRE agent: %w", node, err)
	}
	tokPath := filepath.Join(d, "join-token")
	if err := os.WriteFile(tokPath, []byte(tok.Value), 0o600); err != nil {
		return fmt.Errorf("writing the join token: %w", err)
	}
	host, port, _ := net.SplitHostPort(s.ServerAddr)
	sock := filepath.Join(d, "api.sock")
	// The unix workload attestor with discover_workload_path: selectors
	// unix:uid and unix:path of the calling process (workload_size_limit
	// 0: no sha256 of the binary).
	conf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "INFO"
  server_address = %q
  server_port = %q
  socket_path = %q
  trust_bundle_path = %q
  trust_domain = %q
}

plugins {
  KeyManager "memory" {
    plugin_data {}
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {
      discover_workload_path = true
    }
  }
}
`, d, host, port, sock, bundlePath, s.td.Name())
	path := filepath.Join(d, "agent.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return fmt.Errorf("writing the SPIRE agent configuration: %w", err)
	}
	p, err := s.lab.StartNodeProcess(ctx, node, AgentProcess, []string{s.agentBin, "run", "-config", path, "-joinTokenFile", tokPath}, nil)
	if err != nil {
		return fmt.Errorf("starting spire-agent on %s: %w", node, err)
	}
	a := &Agent{Node: node, ID: id, Socket: sock, Pid: p.Pid, Log: p.Log}
	s.Agents[node] = a
	s.log.Info("SPIRE agent started", "node", node, "id", id.String(), "pid", p.Pid)
	return s.waitHealthy(ctx, "spire-agent on "+node, p, func(ctx context.Context) error {
		_, err := s.run(ctx, s.agentBin, "healthcheck", "-socketPath", sock)
		return err
	})
}

// waitHealthy polls check until it passes, the process exits or ctx ends.
func (s *SPIRE) waitHealthy(ctx context.Context, what string, p lab.Process, check func(context.Context) error) error {
	for {
		err := check(ctx)
		if err == nil {
			return nil
		}
		if !s.lab.Running(p) {
			return fmt.Errorf("%s (pid %d) exited; see %s", what, p.Pid, p.Log)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s to be healthy: %w (last: %w)", what, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Entry is a registration entry for a workload on one node.
type Entry struct {
	// Node is the node whose SPIRE agent is the entry's parent: only that
	// agent's workloads can get the SVID.
	Node     string
	SPIFFEID spiffeid.ID
	// Selectors match the workload, "type:value" (ProcessSelectors).
	Selectors []string
}

// CreateEntry registers e and returns the entry's ID.
func (s *SPIRE) CreateEntry(ctx context.Context, e Entry) (string, error) {
	a, ok := s.Agents[e.Node]
	if !ok {
		return "", fmt.Errorf("creating the entry for %s: no SPIRE agent on node %q", e.SPIFFEID, e.Node)
	}
	if e.SPIFFEID.TrustDomain() != s.td {
		return "", fmt.Errorf("creating the entry for %s: not in SPIRE's trust domain %s", e.SPIFFEID, s.td)
	}
	if len(e.Selectors) == 0 {
		return "", fmt.Errorf("creating the entry for %s: no selectors", e.SPIFFEID)
	}
	args := []string{"entry", "create", "-parentID", a.ID.String(), "-spiffeID", e.SPIFFEID.String(), "-output", "json"}
	for _, sel := range e.Selectors {
		args = append(args, "-selector", sel)
	}
	out, err := s.cli(ctx, args...)
	if err != nil {
		return "", fmt.Errorf("creating the entry for %s under %s: %w", e.SPIFFEID, e.Node, err)
	}
	var resp struct {
		Results []struct {
			Status struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"status"`
			Entry struct {
				ID string `json:"id"`
			} `json:"entry"`
		} `json:"results"`
	}
	if err := json.Unmarshal(out, &resp); err != nil || len(resp.Results) != 1 {
		return "", fmt.Errorf("creating the entry for %s under %s: unexpected answer %q (%v)", e.SPIFFEID, e.Node, out, err)
	}
	r := resp.Results[0]
	if r.Status.Code != 0 || r.Entry.ID == "" {
		return "", fmt.Errorf("creating the entry for %s under %s: SPIRE refused it (code %d): %s", e.SPIFFEID, e.Node, r.Status.Code, r.Status.Message)
	}
	return r.Entry.ID, nil
}

// DeleteEntry deletes the registration entry with the given ID.
func (s *SPIRE) DeleteEntry(ctx context.Context, id string) error {
	if _, err := s.cli(ctx, "entry", "delete", "-entryID", id); err != nil {
		return fmt.Errorf("deleting entry %s: %w", id, err)
	}
	return nil
}

// Bundle returns the roots of SPIRE's trust bundle for its trust domain.
func (s *SPIRE) Bundle(ctx context.Context) ([]*x509.Certificate, error) {
	out, err := s.cli(ctx, "bundle", "show", "-format", "pem")
	if err != nil {
		return nil, fmt.Errorf("reading SPIRE's bundle: %w", err)
	}
	var roots []*x509.Certificate
	for rest := out; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing SPIRE's bundle: %w", err)
		}
		roots = append(roots, c)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("SPIRE's bundle has no certificates: %q", out)
	}
	return roots, nil
}

// FetchX509 asks node's SPIRE agent for X.509 SVIDs as a process that is
// not the nodemesh agent (spire-agent's own CLI, run inside the node): it
// returns the CLI's output, and an error when SPIRE issued nothing.
func (s *SPIRE) FetchX509(ctx context.Context, node string) ([]byte, error) {
	a, ok := s.Agents[node]
	if !ok {
		return nil, fmt.Errorf("no SPIRE agent on node %q", node)
	}
	return s.lab.ExecNode(ctx, node, []string{s.agentBin, "api", "fetch", "x509", "-socketPath", a.Socket, "-timeout", "5s"})
}

// ProcessSelectors returns unix workload attestor selectors that match
// only processes of this user running the executable bin (the nodemesh
// agent): its resolved path and the caller's uid. A registration entry
// with them hands its SVID to that binary and to nothing else on the node.
func ProcessSelectors(bin string) ([]string, error) {
	p, err := filepath.Abs(bin)
	if err == nil {
		p, err = filepath.EvalSymlinks(p)
	}
	if err != nil {
		return nil, fmt.Errorf("resolving %s for the unix:path selector: %w", bin, err)
	}
	return []string{fmt.Sprintf("unix:uid:%d", os.Geteuid()), "unix:path:" + p}, nil
}

// cli runs a spire-server command against the server's admin socket.
func (s *SPIRE) cli(ctx context.Context, args ...string) ([]byte, error) {
	if len(args) == 0 {
		return nil, errors.New("spire-server: no command")
	}
	// The command's flags follow its words ("entry create -socketPath").
	words := 1
	if len(args) > 1 && !strings.HasPrefix(args[1], "-") {
		words = 2
	}
	argv := append(append(append([]string{}, args[:words]...), "-socketPath", s.serverSock), args[words:]...)
	return s.run(ctx, s.serverBin, argv...)
}

// run runs a SPIRE CLI from this process: the sockets are files, reachable
// from any network namespace.
func (s *SPIRE) run(ctx context.Context, bin string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()+" "+stdout.String()))
	}
	return stdout.Bytes(), nil
}

// Stop stops the agents and the server and removes SPIRE's files (its
// logs stay with the lab's). It is safe to call more than once.
func (s *SPIRE) Stop(ctx context.Context) error {
	var errs []error
	for node := range s.Agents {
		if err := s.stopProcess(ctx, node, AgentProcess); err != nil {
			errs = append(errs, err)
		}
	}
	if err := s.stopProcess(ctx, s.ServerNode, ServerProcess); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(s.dir); err != nil {
		errs = append(errs, fmt.Errorf("removing %s: %w", s.dir, err))
	}
	return errors.Join(errs...)
}

func (s *SPIRE) stopProcess(ctx context.Context, node, name string) error {
	for _, p := range s.lab.Processes() {
		if p.Node == node && p.Name == name {
			if err := s.lab.StopNodeProcess(ctx, node, name, 10*time.Second); err != nil {
				return fmt.Errorf("stopping %s on %s: %w", name, node, err)
			}
			return nil
		}
	}
	return nil // never started
}

// logTails returns the ends of the SPIRE logs, for errors.
func (s *SPIRE) logTails() string {
	var b strings.Builder
	logs := []string{s.ServerLog}
	for _, a := range s.Agents {
		logs = append(logs, a.Log)
	}
	for _, path := range logs {
		if path == "" {
			continue
		}
		out, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		if len(out) > 2000 {
			out = out[len(out)-2000:]
		}
		fmt.Fprintf(&b, "\n--- %s:\n%s", path, strings.TrimSpace(string(out)))
	}
	return b.String()
}
