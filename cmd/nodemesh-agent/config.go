package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/cni"
	"github.com/nodemesh/nodemesh/agent/node"
	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/agent/telemetry"
	"github.com/nodemesh/nodemesh/agent/workloads"
	"github.com/nodemesh/nodemesh/identity"
)

// Config is everything the agent needs, from flags and (where Kubernetes
// convention wants it) the environment. Validate checks it once.
type Config struct {
	NodeName string
	// Exactly one source of cluster state: a kubeconfig file, the in-cluster
	// configuration, or a directory of static manifests.
	Kubeconfig string
	InCluster  bool
	StaticDir  string

	TrustDomain string
	// ClusterDomain (the DNS suffix of Service names) and ClusterID (this
	// cluster's name) fill the Istio metric labels destination_service and
	// source_cluster/destination_cluster.
	ClusterDomain string
	ClusterID     string

	// Dataplane: capture, SVIDs and proxying. Off runs only the cluster
	// state, admin, metrics and readiness (an observer, for debugging).
	Dataplane bool
	// IdentitySource is ca (the nodemesh CA) or spiffe-workload-api (a
	// SPIRE agent's Workload API at SPIFFEEndpoint).
	IdentitySource string
	SPIFFEEndpoint string
	// CA: the nodemesh CA's URL, SPIFFE ID and the agent's token for it,
	// and where its trust bundle is published.
	CAAddr          string
	CAID            string
	CATokenFile     string
	BundleConfigMap string // namespace/name
	CgroupRoot      string // "" = the cgroup2 mount point
	// PodNetns says how a local pod's network namespace is found: "proc"
	// (real nodes: the pod UID in /proc/<pid>/cgroup, never annotations),
	// "annotations" (the lab, which writes them as kubelet would), or
	// "auto" (annotations where present, else /proc).
	PodNetns  string
	BPFPinDir string // "" = redirect's default
	// CNISocket is the unix socket the nodemesh CNI plugin reaches the
	// agent on (agent/cni); "" serves none.
	CNISocket string
	// CNIConfDir and CNIBinDir are the node's CNI directories (hostPath
	// mounts): with both set the agent installs the plugin (CNIPlugin)
	// there and chains it into the network configuration, and keeps it
	// so. CNIExclude are the plugin's excludeNamespaces.
	CNIConfDir string
	CNIBinDir  string
	CNIPlugin  string
	// CNIExcludeList is --cni-exclude-namespaces as given.
	CNIExcludeList string
	CNIExclude     []string
	// CNIHold is the plugin's holdWhenAgentDown (cni.HoldMeshed or
	// cni.HoldAll).
	CNIHold string
	// OnlyPods (--only-pod NAMESPACE/NAME, repeatable) restricts the agent
	// to these pods of its node: per-pod (sidecar) mode, see onlypod.go.
	OnlyPods []string

	DrainDeadline time.Duration
	AdminAddr     string
	MetricsAddr   string
	ReadinessAddr string
	// MetricsScrapers are the service accounts (namespace/name) whose pods
	// may read metrics from outside the node (a Prometheus in the cluster).
	MetricsScrapers []string
	LogLevel        string
	AccessLog       bool
	OTLPEndpoint    string
	TraceSampling   float64
	CRDRecheck      time.Duration
	// Node mark (agent/rollout): how long peers honour it and how often
	// it is renewed.
	MarkDuration time.Duration
	MarkRenew    time.Duration
	Procs        string

	// Derived by Validate.
	td         spiffeid.TrustDomain
	caID       spiffeid.ID
	level      slog.Level
	procsN     int
	bundleNS   string
	bundleName string
	onlyPods   map[string]bool
}

// parseConfig reads flags from args and defaults from getenv.
func parseConfig(args []string, getenv func(string) string) (*Config, error) {
	c := &Config{}
	fs := flags(c, getenv)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	c.InCluster = c.Kubeconfig == "" && c.StaticDir == ""
	return c, nil
}

// flags defines the agent's flags on c, with defaults from getenv where
// Kubernetes convention wants them (docs/install.md lists them; a test
// keeps that table in step).
func flags(c *Config, getenv func(string) string) *flag.FlagSet {
	fs := flag.NewFlagSet("nodemesh-agent", flag.ContinueOnError)
	envOr := func(key, def string) string {
		if v := getenv(key); v != "" {
			return v
		}
		return def
	}
	fs.StringVar(&c.NodeName, "node-name", envOr("NODE_NAME", getenv("NODEMESH_NODE_NAME")), "this node's name (default $NODE_NAME, the downward API)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", getenv("KUBECONFIG"), "kubeconfig file (default $KUBECONFIG); empty with --static-dir empty = in-cluster configuration")
	fs.StringVar(&c.StaticDir, "static-dir", "", "read cluster state from the Kubernetes YAML (*.yaml, *.yml, *.json) in this directory and its subdirectories, re-read every 5s, instead of an API server (hidden files and directories are skipped)")
	fs.StringVar(&c.TrustDomain, "trust-domain", envOr("TRUST_DOMAIN", identity.DefaultTrustDomain), "SPIFFE trust domain")
	fs.StringVar(&c.ClusterDomain, "cluster-domain", envOr("CLUSTER_DOMAIN", telemetry.DefaultClusterDomain), "the cluster's DNS domain: Services are name.namespace.svc.<domain> in the destination_service metric label (default $CLUSTER_DOMAIN)")
	fs.StringVar(&c.ClusterID, "cluster-id", envOr("CLUSTER_ID", telemetry.DefaultClusterID), "this cluster's name in the source_cluster and destination_cluster metric labels; Istio's default is Kubernetes (default $CLUSTER_ID)")
	fs.BoolVar(&c.Dataplane, "dataplane", true, "capture, SVIDs and proxying; false runs only state, admin and metrics")
	fs.StringVar(&c.IdentitySource, "identity-source", node.IdentityCA, "where the pods' SVIDs come from: ca (the nodemesh CA) or spiffe-workload-api (a SPIRE agent on the node, see --spiffe-endpoint-socket; the --ca-* flags and --bundle-configmap are then unused)")
	fs.StringVar(&c.SPIFFEEndpoint, "spiffe-endpoint-socket", getenv("SPIFFE_ENDPOINT_SOCKET"), "the SPIFFE Workload API socket with --identity-source=spiffe-workload-api, unix:///run/spire/sockets/agent.sock or an absolute path (default $SPIFFE_ENDPOINT_SOCKET)")
	fs.StringVar(&c.CAAddr, "ca-addr", envOr("CA_ADDR", fmt.Sprintf("https://nodemesh-ca.nodemesh-system.svc:%d", identity.DefaultPort)), "nodemesh CA URL (default $CA_ADDR)")
	fs.StringVar(&c.CAID, "ca-spiffe-id", "", "SPIFFE ID of the CA's serving certificate (default spiffe://<trust domain>/ns/nodemesh-system/sa/nodemesh-ca)")
	fs.StringVar(&c.CATokenFile, "ca-token-file", "/var/run/secrets/nodemesh-ca/token", "projected service-account token with audience "+identity.Audience+" (bound to this agent's pod)")
	fs.StringVar(&c.BundleConfigMap, "bundle-configmap", "nodemesh-system/"+identity.BundleConfigMap, "namespace/name of the ConfigMap with the trust bundle")
	fs.StringVar(&c.CgroupRoot, "cgroup-root", "", "cgroup v2 directory above every pod (default: the cgroup2 mount point from /proc/self/mountinfo)")
	fs.StringVar(&c.PodNetns, "pod-netns", workloads.NetnsAuto, "how pods' network namespaces are found: proc (real nodes; needs hostPID), annotations (the lab), or auto (annotations where present, else proc)")
	fs.StringVar(&c.BPFPinDir, "bpf-pin-dir", "", "bpffs directory for pinned capture maps and links (default: redirect's)")
	fs.StringVar(&c.CNISocket, "cni-socket", "", "serve the nodemesh CNI plugin on this unix socket (absolute path; its directory is made root-only): pods are enrolled at sandbox creation, before their containers start (empty: no plugin)")
	fs.StringVar(&c.CNIConfDir, "cni-conf-dir", "", "install the CNI plugin: the node's CNI configuration directory as mounted (e.g. /host/etc/cni/net.d); the plugin becomes the last of its network configuration (needs --cni-socket and --cni-bin-dir; empty: no install)")
	fs.StringVar(&c.CNIBinDir, "cni-bin-dir", "", "the node's CNI plugin directory as mounted (e.g. /host/opt/cni/bin), where --cni-plugin is copied")
	fs.StringVar(&c.CNIPlugin, "cni-plugin", "/usr/local/bin/nodemesh-cni", "the nodemesh-cni binary to install")
	fs.StringVar(&c.CNIHold, "cni-hold-when-down", cni.HoldMeshed, "which new pods the CNI plugin holds back while this agent is down: meshed (those of namespaces the agent last saw in the mesh or did not know; the others start outside the mesh) or all (every pod outside --cni-exclude-namespaces)")
	fs.StringVar(&c.CNIExcludeList, "cni-exclude-namespaces", "kube-system,"+envOr("POD_NAMESPACE", "nodemesh-system"), "comma-separated namespaces whose pods the CNI plugin never holds back, even with the agent down (default: kube-system and $POD_NAMESPACE, the agent's own)")
	fs.Var(onlyPodFlag{c}, "only-pod", "serve only this pod of the node, NAMESPACE/NAME (repeatable): per-pod sidecar mode; give each such agent its own --cgroup-root, --bpf-pin-dir and addresses")
	fs.DurationVar(&c.DrainDeadline, "drain-deadline", 30*time.Second, "on SIGTERM, how long open connections may finish before they are reset")
	fs.StringVar(&c.AdminAddr, "admin-addr", admin.DefaultAdminAddr, "admin API address (keep it on loopback)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", admin.DefaultMetricsAddr, "Prometheus metrics address")
	fs.StringVar(&c.ReadinessAddr, "readiness-addr", admin.DefaultReadinessAddr, "readiness probe address")
	fs.Func("metrics-scrapers", "comma-separated service accounts (namespace/name) whose pods may scrape metrics from outside the node; default none (only the node itself)", func(v string) error {
		for sa := range strings.SplitSeq(v, ",") {
			if sa = strings.TrimSpace(sa); sa != "" {
				c.MetricsScrapers = append(c.MetricsScrapers, sa)
			}
		}
		return nil
	})
	fs.StringVar(&c.LogLevel, "log-level", envOr("LOG_LEVEL", "info"), "debug, info, warn or error (changeable at run time through the admin API)")
	fs.BoolVar(&c.AccessLog, "access-log", false, "write one JSON line per closed connection to stdout")
	fs.StringVar(&c.OTLPEndpoint, "otlp-endpoint", "", "OTLP/HTTP collector URL for the L7 path's spans, e.g. http://otel-collector.observability:4318; empty: no tracing")
	fs.Float64Var(&c.TraceSampling, "trace-sampling", 0.01, "probability (0 to 1) that an L7 request starting a new trace is recorded; requests with a sampled traceparent are always recorded")
	fs.DurationVar(&c.CRDRecheck, "crd-recheck", 30*time.Second, "how often to look for nodemesh CRDs that were not installed when the agent started")
	fs.DurationVar(&c.MarkDuration, "node-mark-duration", rollout.DefaultLeaseDuration, "how long peers honour this node's mark (its Lease) without a renewal: how long a crashed agent's node still counts as mesh-capable")
	fs.StringVar(&c.Procs, "procs", procsDefault(getenv), "GOMAXPROCS: auto (one P at light load, more while the agent keeps them busy, up to the CPUs or the cgroup CPU limit), runtime (the Go runtime's choice; the default when $GOMAXPROCS is set), or a number")
	fs.DurationVar(&c.MarkRenew, "node-mark-renew", rollout.DefaultRenewInterval, "how often the node mark is renewed: one Lease write per node, and one watch event for every agent, each time")
	return fs
}

// Validate checks the config and fills the derived fields. Every problem is
// reported at once.
func (c *Config) Validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("--node-name (or $NODE_NAME) is required: the agent serves the pods of one node"))
	}
	if c.StaticDir != "" && c.Kubeconfig != "" {
		errs = append(errs, errors.New("--static-dir and --kubeconfig are alternatives; give one"))
	}
	if c.StaticDir != "" {
		if fi, err := os.Stat(c.StaticDir); err != nil || !fi.IsDir() {
			errs = append(errs, fmt.Errorf("--static-dir %q is not a readable directory", c.StaticDir))
		}
	}
	if msgs := validation.IsDNS1123Subdomain(c.ClusterDomain); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--cluster-domain %q is not a DNS domain (like cluster.local): %s", c.ClusterDomain, strings.Join(msgs, "; ")))
	}
	if c.ClusterID == "" {
		errs = append(errs, errors.New("--cluster-id is empty: give this cluster's name (Istio's default is Kubernetes)"))
	}
	if c.TraceSampling < 0 || c.TraceSampling > 1 || c.TraceSampling != c.TraceSampling {
		errs = append(errs, fmt.Errorf("--trace-sampling %v: want a probability from 0 to 1 (0.01 records 1%% of new traces)", c.TraceSampling))
	}
	if c.OTLPEndpoint != "" {
		if u, err := url.Parse(c.OTLPEndpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
			errs = append(errs, fmt.Errorf("--otlp-endpoint %q: want the collector's OTLP/HTTP base URL, like http://otel-collector:4318 (spans go to /v1/traces)", c.OTLPEndpoint))
		}
		c.OTLPEndpoint = strings.TrimSuffix(c.OTLPEndpoint, "/")
	}
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		errs = append(errs, fmt.Errorf("--trust-domain %q: %w", c.TrustDomain, err))
	}
	c.td = td
	switch c.IdentitySource {
	case node.IdentityCA:
		// $SPIFFE_ENDPOINT_SOCKET alone does not switch sources.
	case node.IdentitySPIFFE:
		if c.Dataplane {
			errs = append(errs, c.validateSPIFFE()...)
		}
	default:
		errs = append(errs, fmt.Errorf("--identity-source %q: want %s or %s", c.IdentitySource, node.IdentityCA, node.IdentitySPIFFE))
	}
	if c.Dataplane && c.IdentitySource == node.IdentityCA {
		u, err := url.Parse(c.CAAddr)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			errs = append(errs, fmt.Errorf("--ca-addr %q: want https://host:port", c.CAAddr))
		}
		if c.CAID == "" && err == nil && !td.IsZero() {
			c.CAID = "spiffe://" + td.Name() + "/ns/nodemesh-system/sa/nodemesh-ca"
		}
		if c.CAID != "" {
			id, err := spiffeid.FromString(c.CAID)
			if err != nil {
				errs = append(errs, fmt.Errorf("--ca-spiffe-id %q: %w", c.CAID, err))
			}
			c.caID = id
		}
		if c.CATokenFile == "" {
			errs = append(errs, errors.New("--ca-token-file is required with the data plane on"))
		}
		if c.StaticDir != "" {
			errs = append(errs, errors.New("--static-dir cannot provide the trust bundle ConfigMap; run with --dataplane=false or against an API server"))
		}
		ns, name, ok := strings.Cut(c.BundleConfigMap, "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			errs = append(errs, fmt.Errorf("--bundle-configmap %q: want namespace/name", c.BundleConfigMap))
		}
		c.bundleNS, c.bundleName = ns, name
	}
	if c.Dataplane {
		switch c.PodNetns {
		case workloads.NetnsAuto, workloads.NetnsProc, workloads.NetnsAnnotations:
		default:
			errs = append(errs, fmt.Errorf("--pod-netns %q: want proc, annotations or auto", c.PodNetns))
		}
	}
	if c.CNISocket != "" {
		switch {
		case !c.Dataplane:
			errs = append(errs, errors.New("--cni-socket needs the data plane (--dataplane=true): without it no pod can be enrolled"))
		case !strings.HasPrefix(c.CNISocket, "/"):
			errs = append(errs, fmt.Errorf("--cni-socket %q: want an absolute path", c.CNISocket))
		}
	}
	c.CNIExclude = nil
	for ns := range strings.SplitSeq(c.CNIExcludeList, ",") {
		if ns = strings.TrimSpace(ns); ns != "" {
			c.CNIExclude = append(c.CNIExclude, ns)
		}
	}
	if c.CNIConfDir != "" || c.CNIBinDir != "" {
		if c.CNIConfDir == "" || c.CNIBinDir == "" || c.CNISocket == "" {
			errs = append(errs, errors.New("installing the CNI plugin needs --cni-conf-dir, --cni-bin-dir and --cni-socket together"))
		}
		if c.CNIHold != cni.HoldMeshed && c.CNIHold != cni.HoldAll {
			errs = append(errs, fmt.Errorf("--cni-hold-when-down %q: want %s or %s", c.CNIHold, cni.HoldMeshed, cni.HoldAll))
		}
		for _, ns := range c.CNIExclude {
			if msgs := validation.IsDNS1123Label(ns); len(msgs) > 0 {
				errs = append(errs, fmt.Errorf("--cni-exclude-namespaces: %q: %s", ns, strings.Join(msgs, "; ")))
			}
		}
	}
	errs = append(errs, c.validateOnlyPods()...)
	if c.CRDRecheck < time.Second {
		errs = append(errs, fmt.Errorf("--crd-recheck %s: at least 1s", c.CRDRecheck))
	}
	if c.MarkDuration < time.Second || c.MarkDuration > time.Hour {
		errs = append(errs, fmt.Errorf("--node-mark-duration %s: must be between 1s and 1h", c.MarkDuration))
	}
	if n, err := c.procs(); err != nil {
		errs = append(errs, err)
	} else {
		c.procsN = n
	}
	if c.MarkRenew <= 0 || 2*c.MarkRenew > c.MarkDuration {
		errs = append(errs, fmt.Errorf("--node-mark-renew %s: must be positive and at most half of --node-mark-duration (%s), so one lost renewal does not unmark the node", c.MarkRenew, c.MarkDuration))
	}
	if c.DrainDeadline < 0 || c.DrainDeadline > time.Hour {
		errs = append(errs, fmt.Errorf("--drain-deadline %s: must be between 0 and 1h", c.DrainDeadline))
	}
	for _, a := range []struct{ flag, addr string }{
		{"--admin-addr", c.AdminAddr}, {"--metrics-addr", c.MetricsAddr}, {"--readiness-addr", c.ReadinessAddr},
	} {
		if a.addr == "" {
			continue // disabled
		}
		if _, _, err := net.SplitHostPort(a.addr); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", a.flag, a.addr, err))
		}
	}
	if host, _, err := net.SplitHostPort(c.AdminAddr); err == nil {
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			errs = append(errs, fmt.Errorf("--admin-addr %q: the admin API (log level, pprof, config dump) must listen on loopback", c.AdminAddr))
		}
	}
	for _, sa := range c.MetricsScrapers {
		if ns, name, ok := strings.Cut(sa, "/"); !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			errs = append(errs, fmt.Errorf("--metrics-scrapers: %q is not namespace/name of a service account", sa))
		}
	}
	lv, err := admin.ParseLevel(c.LogLevel)
	if err != nil {
		errs = append(errs, fmt.Errorf("--log-level: %w", err))
	}
	c.level = lv
	return errors.Join(errs...)
}

// validateSPIFFE checks --spiffe-endpoint-socket (a bare absolute path
// becomes unix://path). That the socket exists is checked at start.
func (c *Config) validateSPIFFE() []error {
	if c.SPIFFEEndpoint == "" {
		return []error{errors.New("--identity-source=spiffe-workload-api needs --spiffe-endpoint-socket (or $SPIFFE_ENDPOINT_SOCKET): the SPIRE agent's socket on this node, e.g. unix:///run/spire/sockets/agent.sock")}
	}
	if strings.HasPrefix(c.SPIFFEEndpoint, "/") {
		c.SPIFFEEndpoint = "unix://" + c.SPIFFEEndpoint
	}
	if err := workloadapi.ValidateAddress(c.SPIFFEEndpoint); err != nil {
		return []error{fmt.Errorf("--spiffe-endpoint-socket %q: %w (want unix:///path/to/agent.sock or an absolute path)", c.SPIFFEEndpoint, err)}
	}
	return nil
}

// restConfig loads the Kubernetes client configuration (nil with
// --static-dir).
func (c *Config) restConfig() (*rest.Config, error) {
	switch {
	case c.StaticDir != "":
		return nil, nil
	case c.InCluster:
		rc, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("loading the in-cluster Kubernetes configuration (outside a pod, pass --kubeconfig or --static-dir): %w", err)
		}
		return rc, nil
	}
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading kubeconfig %s: %w", c.Kubeconfig, err)
	}
	return rc, nil
}

// nodeConfig is what the validated config passes down to agent/node.
func (c *Config) nodeConfig(rc *rest.Config, log *slog.Logger, level *slog.LevelVar, access *slog.Logger) node.Config {
	return node.Config{
		NodeName: c.NodeName, TrustDomain: c.td, Rest: rc, StaticDir: c.StaticDir,
		ClusterDomain: c.ClusterDomain, ClusterID: c.ClusterID,
		Dataplane: c.Dataplane, IdentitySource: c.IdentitySource, SPIFFEEndpoint: c.SPIFFEEndpoint,
		CAAddr: c.CAAddr, CAID: c.caID, CATokenFile: c.CATokenFile,
		BundleNamespace: c.bundleNS, BundleName: c.bundleName,
		CgroupRoot: c.CgroupRoot, PodNetns: c.PodNetns, BPFPinDir: c.BPFPinDir, CNISocket: c.CNISocket, CNIInstall: c.cniInstall(), OnlyPods: c.onlyPods,
		DrainDeadline: c.DrainDeadline, AdminAddr: c.AdminAddr, MetricsAddr: c.MetricsAddr, ReadinessAddr: c.ReadinessAddr,
		MetricsScrapers: c.MetricsScrapers,
		CRDRecheck:      c.CRDRecheck, MarkDuration: c.MarkDuration, MarkRenew: c.MarkRenew,
		Procs: c.procsN,
		Log:   log, Level: level, AccessLog: access,
		OTLPEndpoint: c.OTLPEndpoint, TraceSampling: c.TraceSampling,
	}
}

// procsDefault is auto, unless the operator set $GOMAXPROCS.
func procsDefault(getenv func(string) string) string {
	if getenv("GOMAXPROCS") != "" {
		return "runtime"
	}
	return "auto"
}

// procs parses --procs into node.Config.Procs.
func (c *Config) procs() (int, error) {
	switch c.Procs {
	case "auto", "":
		return node.ProcsAuto, nil
	case "runtime":
		return node.ProcsRuntime, nil
	}
	n, err := strconv.Atoi(c.Procs)
	if err != nil || n < 1 || n > 1024 {
		return 0, fmt.Errorf("--procs %q: want auto, runtime, or a number of Ps from 1 to 1024", c.Procs)
	}
	return n, nil
}

// cniInstall is where the agent installs the CNI plugin (nil: it does not).
func (c *Config) cniInstall() *cni.InstallConfig {
	if c.CNIConfDir == "" {
		return nil
	}
	return &cni.InstallConfig{Plugin: c.CNIPlugin, BinDir: c.CNIBinDir, ConfDir: c.CNIConfDir,
		Socket: c.CNISocket, ExcludeNamespaces: c.CNIExclude, HoldWhenAgentDown: c.CNIHold}
}
