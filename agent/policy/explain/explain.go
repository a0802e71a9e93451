// Package explain implements "nodemeshctl policy explain": offline, it loads
// Namespaces, Pods, Nodes, NetworkPolicies, AuthorizationPolicies and
// PeerAuthentications from YAML files through the agent's own intake
// (agent/k8s into agent/state, then agent/policy/fromstate), builds a
// policy.Snapshot and asks the same engine the agent uses why a connection
// would be allowed or denied; live, it asks an agent's admin API, which
// serves Handler. Both answer from the same conversion of the same objects.
//
// The file handling lives here so that package policy stays free of I/O.
package explain

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/k8s"
	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/l7/authz"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/fromstate"
	"github.com/nodemesh/nodemesh/agent/state"
)

const usage = `usage: nodemeshctl policy explain (--from-files DIR | --agent URL) --src SRC --dst DST --port PORT [flags]

Explains whether a connection is allowed by NetworkPolicy, AuthorizationPolicy
and the mTLS mode, which direction decided, and which policy and rule.
--from-files evaluates YAML files offline; --agent asks a running agent's admin
API (GET /policy/explain), which answers from the snapshot it enforces.

SRC and DST are namespace/pod or an IP address. DIR holds Kubernetes YAML or
JSON (Namespaces, Pods, Nodes, NetworkPolicies, AuthorizationPolicies,
PeerAuthentications; other kinds are ignored), searched recursively.

By default the connection is taken to be mTLS (HBONE) with the source pod's
SPIFFE ID when both pods are enrolled in the mesh, plaintext otherwise;
--principal and --plaintext override that.

--method, --path, --host and --header explain one HTTP request instead, decided
per request when the destination port is handled at L7 (docs/l7.md).

Flags:
`

// Run runs "policy <subcommand> args...". args excludes "policy".
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, "usage: nodemeshctl policy explain [flags]   (run with -h for flags)\n")
		if len(args) == 0 {
			return errors.New("missing subcommand (want explain)")
		}
		return nil
	}
	switch args[0] {
	case "explain":
		return runExplain(ctx, args[1:], stdout, stderr)
	}
	return fmt.Errorf("unknown subcommand %q (want explain)", args[0])
}

type options struct {
	dir, agent, src, dst, protocol, principal, output, trustDomain, rootNS, direction string
	port                                                                              uint
	plaintext                                                                         bool
	// An HTTP request to explain (any of them set): decided per request
	// at the destination when its port is handled at L7.
	method, path, host string
	headers            []string // name=value
}

// isRequest reports whether a request was described.
func (o *options) isRequest() bool {
	return o.method != "" || o.path != "" || o.host != "" || len(o.headers) > 0
}

// Options are the flags of "policy explain", for a command line built
// elsewhere (nodemeshctl registers them with Register and may set the
// agent to ask with SetAgent).
type Options struct{ o options }

// Register adds the flags of policy explain to fs and returns the options
// they fill.
func Register(fs *flag.FlagSet) *Options {
	opts := &Options{}
	o := &opts.o
	fs.StringVar(&o.dir, "from-files", "", "directory of Kubernetes YAML to evaluate (offline explain)")
	fs.StringVar(&o.agent, "agent", "", "admin API of a running agent to ask (live explain), e.g. http://127.0.0.1:15000")
	fs.StringVar(&o.src, "src", "", "source: namespace/pod or IP")
	fs.StringVar(&o.dst, "dst", "", "destination: namespace/pod or IP (the real endpoint, not a ClusterIP)")
	fs.UintVar(&o.port, "port", 0, "destination port the application connects to")
	fs.StringVar(&o.protocol, "protocol", "TCP", "TCP, UDP or SCTP")
	fs.StringVar(&o.principal, "principal", "", "source SPIFFE ID presented over mTLS (default: derived from the source pod when both ends are enrolled)")
	fs.BoolVar(&o.plaintext, "plaintext", false, "evaluate as a plaintext connection (no source identity)")
	fs.StringVar(&o.output, "o", "text", "output format: text, json or yaml")
	fs.StringVar(&o.trustDomain, "trust-domain", policy.DefaultTrustDomain, "SPIFFE trust domain of the mesh")
	fs.StringVar(&o.rootNS, "root-namespace", policy.DefaultRootNamespace, "namespace whose selector-less policies apply mesh-wide")
	fs.StringVar(&o.direction, "direction", "both", "evaluate both, egress (source agent) or ingress (destination agent)")
	fs.StringVar(&o.method, "method", "", "explain an HTTP request with this method (default GET when --path, --host or --header is given)")
	fs.StringVar(&o.path, "path", "", "explain an HTTP request for this path, as the client sends it, e.g. /api/../admin (default /)")
	fs.StringVar(&o.host, "host", "", "explain an HTTP request with this Host (:authority)")
	fs.Func("header", "a request header of the HTTP request, name=value (repeatable)", func(v string) error {
		o.headers = append(o.headers, v)
		return nil
	})
	return opts
}

// FromFiles is --from-files; Agent is --agent; Src is --src.
func (o *Options) FromFiles() string { return o.o.dir }
func (o *Options) Agent() string     { return o.o.agent }
func (o *Options) Src() string       { return o.o.src }

// SetAgent sets the admin API to ask (live explain).
func (o *Options) SetAgent(url string) { o.o.agent = url }

// Validate checks the flags without running anything.
func (o *Options) Validate() error {
	if err := o.o.validate(); err != nil {
		return fmt.Errorf("explain: %w", err)
	}
	return nil
}

// Run explains the connection the options describe and prints the answer
// to stdout (notes to stderr).
func (o *Options) Run(ctx context.Context, stdout, stderr io.Writer) error {
	if err := o.Validate(); err != nil {
		return err
	}
	if (o.o.dir == "") == (o.o.agent == "") {
		return errors.New("explain: give either --from-files DIR (offline) or --agent URL (live)")
	}
	var d *policy.Decision
	var err error
	if o.o.agent != "" {
		d, err = askAgent(ctx, &o.o)
	} else {
		d, err = explainFiles(&o.o, stderr)
	}
	if err != nil {
		return fmt.Errorf("explain: %w", err)
	}
	switch o.o.output {
	case "json", "yaml":
		b, err := json.MarshalIndent(d, "", "  ")
		if err != nil {
			return fmt.Errorf("explain: encoding JSON: %w", err)
		}
		if o.o.output == "yaml" {
			if b, err = yaml.JSONToYAML(b); err != nil {
				return fmt.Errorf("explain: encoding YAML: %w", err)
			}
			_, err = stdout.Write(b)
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	default:
		_, err := io.WriteString(stdout, d.Text())
		return err
	}
}

func runExplain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("policy explain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	o := Register(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("explain: unexpected argument %q", fs.Arg(0))
	}
	return o.Run(ctx, stdout, stderr)
}

func (o *options) validate() error {
	switch {
	case o.src == "" || o.dst == "":
		return errors.New("--src and --dst are required (namespace/pod or IP)")
	case o.port == 0 || o.port > 65535:
		return fmt.Errorf("--port %d: want 1-65535", o.port)
	case o.output != "text" && o.output != "table" && o.output != "json" && o.output != "yaml":
		return fmt.Errorf("-o %q: want text, json or yaml", o.output)
	case o.plaintext && o.principal != "":
		return errors.New("--plaintext and --principal are mutually exclusive")
	case o.direction != "both" && o.direction != "egress" && o.direction != "ingress":
		return fmt.Errorf("--direction %q: want both, egress or ingress", o.direction)
	}
	o.protocol = strings.ToUpper(o.protocol)
	switch corev1.Protocol(o.protocol) {
	case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
	default:
		return fmt.Errorf("--protocol %q: want TCP, UDP or SCTP", o.protocol)
	}
	if o.principal != "" && !strings.HasPrefix(o.principal, "spiffe://") {
		return fmt.Errorf("--principal %q: want a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)", o.principal)
	}
	if o.isRequest() {
		if _, err := o.request(); err != nil {
			return err
		}
		if corev1.Protocol(o.protocol) != corev1.ProtocolTCP {
			return fmt.Errorf("--method, --path, --host and --header describe an HTTP request: --protocol must be TCP, not %s", o.protocol)
		}
		if o.direction == "egress" {
			return errors.New("requests are authorised by the destination agent; the source's egress checks see only the connection: use --direction both or ingress")
		}
	}
	return nil
}

// request builds the HTTP request the flags describe, as net/http would
// parse it off the wire.
func (o *options) request() (*http.Request, error) {
	method := cmp.Or(o.method, http.MethodGet)
	for _, c := range method {
		if c <= ' ' || c >= 0x7f || strings.ContainsRune("()<>@,;:\\\"/[]?={}", c) {
			return nil, fmt.Errorf("--method %q: not an HTTP method token", method)
		}
	}
	p := cmp.Or(o.path, "/")
	if !strings.HasPrefix(p, "/") {
		return nil, fmt.Errorf("--path %q: want a path starting with / (the request target as the client sends it)", p)
	}
	u, err := url.ParseRequestURI(p)
	if err != nil {
		return nil, fmt.Errorf("--path %q: %w", p, err)
	}
	r := &http.Request{Method: method, URL: u, Host: o.host, Header: http.Header{}, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
	for _, h := range o.headers {
		k, v, ok := strings.Cut(h, "=")
		if !ok || k == "" || strings.ContainsAny(k, " :\t") {
			return nil, fmt.Errorf("--header %q: want name=value", h)
		}
		r.Header.Add(k, v)
	}
	return r, nil
}

// endpointArg parses "ns/pod" or an IP.
func endpointArg(name, v string) (pod string, ip netip.Addr, err error) {
	if a, perr := netip.ParseAddr(v); perr == nil {
		return "", a.Unmap(), nil
	}
	ns, p, ok := strings.Cut(v, "/")
	if !ok || ns == "" || p == "" || strings.Contains(p, "/") {
		return "", netip.Addr{}, fmt.Errorf("--%s %q: want namespace/pod or an IP address", name, v)
	}
	return v, netip.Addr{}, nil
}

func (o *options) source() string {
	if o.dir != "" {
		return o.dir
	}
	return "the agent's snapshot"
}

// explainFiles loads o.dir and explains the flow offline.
func explainFiles(o *options, stderr io.Writer) (*policy.Decision, error) {
	snap, st, err := loadDir(o.dir, policy.Options{TrustDomain: o.trustDomain, RootNamespace: o.rootNS}, stderr)
	if err != nil {
		return nil, err // names the directory
	}
	return explain(snap, ClaimedBy(st), o)
}

// ClaimedBy reports, from a state snapshot, whether a pod's port is
// handled at L7 (a Service that opted in targets it), as the destination
// agent decides it (l7.ClaimedPorts).
func ClaimedBy(st *state.Snapshot) func(pod string, port uint16) bool {
	ports := l7.ClaimedPorts(st)
	return func(pod string, port uint16) bool {
		ns, name, _ := strings.Cut(pod, "/")
		_, ok := ports[state.Key{Namespace: ns, Name: name}][port]
		return ok
	}
}

func explain(snap *policy.Snapshot, claimed func(pod string, port uint16) bool, o *options) (*policy.Decision, error) {
	f := policy.Flow{Port: uint16(o.port), Protocol: corev1.Protocol(o.protocol)}
	var err error
	if f.SrcPod, f.Src, err = endpointArg("src", o.src); err != nil {
		return nil, err
	}
	if f.DstPod, f.Dst, err = endpointArg("dst", o.dst); err != nil {
		return nil, err
	}
	for _, k := range []string{f.SrcPod, f.DstPod} {
		if k == "" {
			continue
		}
		if _, ok := snap.Pod(k); !ok {
			return nil, fmt.Errorf("pod %s not found in %s", k, o.source())
		}
	}
	switch {
	case o.principal != "":
		f.Principal = o.principal
	case o.plaintext || f.Protocol != corev1.ProtocolTCP:
	default:
		src, srcOK := lookup(snap, f.SrcPod, f.Src)
		dst, dstOK := lookup(snap, f.DstPod, f.Dst)
		if srcOK && dstOK && !src.Unmeshed && !dst.Unmeshed {
			f.Principal = snap.SPIFFEID(src)
		}
	}
	if o.isRequest() {
		return explainRequest(snap, claimed, o, f)
	}
	switch o.direction {
	case "egress":
		return snap.DecideEgress(f), nil
	case "ingress":
		return snap.DecideIngress(f), nil
	}
	return snap.Decide(f), nil
}

// explainRequest decides one HTTP request as the agents would: at the
// destination, per request when its port is handled at L7, otherwise as
// the connection, with rules that have L7 fields failing closed.
func explainRequest(snap *policy.Snapshot, claimed func(pod string, port uint16) bool, o *options, f policy.Flow) (*policy.Decision, error) {
	hr, err := o.request()
	if err != nil {
		return nil, err
	}
	info := &policy.RequestInfo{Method: hr.Method, Path: cmp.Or(o.path, "/"), Host: o.host}
	dstKey := f.DstPod
	if dstKey == "" {
		if p, ok := snap.PodByIP(f.Dst); ok {
			dstKey = p.Namespace + "/" + p.Name
		}
	}
	info.L7 = dstKey != "" && claimed != nil && claimed(dstKey, f.Port)
	connection := func(f policy.Flow) *policy.Decision {
		if o.direction == "ingress" {
			return snap.DecideIngress(f)
		}
		return snap.Decide(f)
	}
	if !info.L7 {
		d := connection(f)
		d.Request = info
		info.Note = fmt.Sprintf("port %d of %s is not handled at L7 (no Service that opted in targets it): the request's method, path, host and headers are never checked, and AuthorizationPolicy rules with L7 fields fail closed for the whole connection (see docs/l7.md)", f.Port, cmp.Or(dstKey, f.Dst.String()))
		return d, nil
	}
	req, err := authz.Prepare(hr, snap.RequestHeaders())
	if err != nil {
		// Refused before any policy: the connection's own decision, then
		// the refusal.
		f.L7 = true
		d := connection(f)
		d.Request = info
		if d.Verdict == policy.Allow {
			reason := strings.TrimPrefix(err.Error(), authz.ErrBadRequest.Error()+": ")
			d.Verdict, d.Direction, d.Policy, d.Rule = policy.Deny, policy.Ingress, policy.PolicyRef{}, -1
			d.Reason = "refused with 400 before authorization: " + reason
			d.Steps = append(d.Steps, policy.Step{Direction: policy.Ingress, Check: CheckRequest, Verdict: policy.Deny, Rule: -1, Reason: d.Reason})
			info.Status = http.StatusBadRequest
		}
		return d, nil
	}
	info.Normalized = req.Path
	var d *policy.Decision
	if o.direction == "ingress" {
		d = snap.DecideRequest(f, &req)
	} else {
		d = snap.DecideRequestBoth(f, &req)
	}
	d.Request = info
	if d.Verdict == policy.Deny {
		if d.Direction == policy.Egress {
			info.Note = "the source agent refuses the connection itself; the request is never sent"
		} else {
			info.Status = http.StatusForbidden
		}
	}
	return d, nil
}

// CheckRequest names the step of a request refused before authorization.
const CheckRequest = "request"

func lookup(s *policy.Snapshot, key string, ip netip.Addr) (policy.Pod, bool) {
	if key != "" {
		return s.Pod(key)
	}
	return s.PodByIP(ip)
}

// LoadDir reads the .yaml, .yml and .json files under dir (recursively)
// the way the agent reads its cluster state, and returns the policy
// snapshot the agent would enforce for those objects. Notes go to warn:
// objects of kinds the agent does not use, and policies the engine refused
// (enforced fail closed, as the agent would).
func LoadDir(dir string, opts policy.Options, warn io.Writer) (*policy.Snapshot, error) {
	snap, _, err := loadDir(dir, opts, warn)
	return snap, err
}

// loadDir is LoadDir, also returning the state snapshot the policy was
// built from.
func loadDir(dir string, opts policy.Options, warn io.Writer) (*policy.Snapshot, *state.Snapshot, error) {
	m, _, err := k8s.LoadDir(dir)
	if err != nil {
		return nil, nil, err
	}
	if len(m.Namespaces)+len(m.Nodes)+len(m.Pods)+len(m.Services)+len(m.EndpointSlices)+len(m.NetworkPolicies)+len(m.Objects)+len(m.Skipped) == 0 {
		return nil, nil, fmt.Errorf("no Kubernetes objects in .yaml, .yml or .json files under %s", dir)
	}
	td, err := spiffeid.TrustDomainFromString(cmp.Or(opts.TrustDomain, policy.DefaultTrustDomain))
	if err != nil {
		return nil, nil, fmt.Errorf("--trust-domain: %w", err)
	}
	st, err := state.NewStore(td)
	if err != nil {
		return nil, nil, err
	}
	st.Update(m.Apply)
	snap, errs := fromstate.Snapshot(st.Snapshot(), opts.RootNamespace)
	if len(m.Skipped) > 0 {
		fmt.Fprintf(warn, "note: ignored %d object(s) of kinds policy explain does not use\n", len(m.Skipped))
	}
	for _, err := range errs {
		fmt.Fprintf(warn, "warning: %v (enforced fail closed for its namespace)\n", err)
	}
	for _, p := range snap.Problems() {
		fmt.Fprintf(warn, "warning: %v (refused, enforced fail closed)\n", p)
	}
	return snap, st.Snapshot(), nil
}
