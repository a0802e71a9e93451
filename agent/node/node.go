// Package node is the agent's lifecycle on one node: it starts the cluster
// state source (agent/k8s into agent/state), the admin, metrics and
// readiness servers (agent/admin), the partial-rollout mark and peers'
// view (agent/rollout), and the mesh (mesh.go: capture, SVIDs, policy and
// the per-pod data plane), and on shutdown stops them in order: unready,
// withdraw the node mark, stop enrolling, drain open connections until the
// deadline, close the data plane leaving capture pinned (enrolled pods fail
// closed until the next agent adopts them), then the rest.
//
// cmd/nodemesh-agent fills Config from flags and calls New and Run.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/cni"
	"github.com/nodemesh/nodemesh/agent/exposure"
	"github.com/nodemesh/nodemesh/agent/k8s"
	"github.com/nodemesh/nodemesh/agent/k8s/apiclient"
	"github.com/nodemesh/nodemesh/agent/procs"
	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/version"
)

// Identity sources (Config.IdentitySource).
const (
	IdentityCA     = "ca"
	IdentitySPIFFE = "spiffe-workload-api"
)

// Values of Config.Procs besides a fixed number.
const (
	ProcsRuntime = 0 // the zero value: leave GOMAXPROCS alone
	ProcsAuto    = -1
)

// cniRecheck is how often the agent checks that its CNI plugin is still
// chained (the network plugin may rewrite its configuration).
const cniRecheck = 5 * time.Second

// procsInterval is how often agent/procs samples the CPU use.
const procsInterval = 500 * time.Millisecond

// Config is the agent's validated configuration (cmd/nodemesh-agent
// validates the flags it comes from).
type Config struct {
	NodeName    string
	TrustDomain spiffeid.TrustDomain
	// ClusterDomain and ClusterID label the Istio metrics (see
	// telemetry.Config); "" takes telemetry's defaults.
	ClusterDomain, ClusterID string
	// Exactly one source of cluster state: an API server (Rest) or a
	// directory of static manifests (StaticDir).
	Rest      *rest.Config
	StaticDir string

	// Dataplane: capture, SVIDs and proxying. Off runs only the cluster
	// state, admin, metrics and readiness (an observer, for debugging).
	Dataplane bool
	// IdentitySource is where the pods' SVIDs come from: IdentityCA (the
	// nodemesh CA, the default when empty) or IdentitySPIFFE (a SPIFFE
	// Workload API endpoint such as a SPIRE agent, at SPIFFEEndpoint:
	// "unix:///path", or "" for $SPIFFE_ENDPOINT_SOCKET).
	IdentitySource string
	SPIFFEEndpoint string
	// The nodemesh CA: URL, SPIFFE ID, the agent's token file for it, and
	// the ConfigMap publishing the trust bundle.
	CAAddr          string
	CAID            spiffeid.ID
	CATokenFile     string
	BundleNamespace string
	BundleName      string
	CgroupRoot      string // "" = the cgroup2 mount point
	PodNetns        string // workloads.Netns*
	BPFPinDir       string // "" = redirect's default
	// CNISocket is where the nodemesh CNI plugin reaches the agent
	// (agent/cni); "" serves no plugin.
	CNISocket string
	// CNIInstall, when set, installs the plugin on the node and keeps it
	// chained (after the socket listens); nil: installed by other means.
	CNIInstall *cni.InstallConfig
	// OnlyPods ("namespace/name") restricts the agent to these pods of its
	// node: per-pod (sidecar) mode. Per-pod agents do not hold the node
	// mark: several on one node would overwrite each other's holder, and
	// one exiting would withdraw the mark for the others.
	OnlyPods map[string]bool

	DrainDeadline time.Duration
	AdminAddr     string
	MetricsAddr   string
	ReadinessAddr string
	// MetricsScrapers are the service accounts (namespace/name) whose pods
	// may read metrics from outside the node.
	MetricsScrapers []string
	CRDRecheck      time.Duration
	// Node mark (agent/rollout): how long peers honour it and how often
	// it is renewed (0: rollout's defaults).
	MarkDuration time.Duration
	MarkRenew    time.Duration
	// Procs sizes GOMAXPROCS: ProcsAuto adapts it to the load (agent/procs),
	// ProcsRuntime leaves the Go runtime's choice, a positive number fixes it.
	Procs int

	Log   *slog.Logger
	Level *slog.LevelVar // changed at run time through the admin API
	// AccessLog receives one record per connection; nil: off.
	AccessLog *slog.Logger
	// OTLPEndpoint, when set, turns on tracing of the L7 path: spans go
	// to this OTLP/HTTP collector (agent/l7/tracing); TraceSampling is the
	// probability that a request starting a trace is recorded.
	OTLPEndpoint  string
	TraceSampling float64
}

// Node owns every long-running part of the agent.
type Node struct {
	cfg     Config
	log     *slog.Logger
	store   *state.Store
	reg     *prometheus.Registry
	metrics *admin.Metrics
	admin   *admin.Server

	client  apiclient.Interface // nil with StaticDir
	dynamic dynamic.Interface
	source  interface{ Run(context.Context) error }

	// Partial rollouts: nil without an API server; mark also nil without
	// a data plane and in per-pod mode.
	peers *rollout.Peers
	mark  *rollout.Mark
	// ledger: plaintext exposure; nil without a data plane.
	ledger *exposure.Ledger

	draining atomic.Bool
	meshUp   atomic.Bool
}

// New creates the node's parts; Run starts them.
func New(cfg Config) (*Node, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Level == nil {
		cfg.Level = new(slog.LevelVar)
	}
	n := &Node{cfg: cfg, log: cfg.Log, reg: prometheus.NewRegistry()}
	var err error
	if n.store, err = state.NewStore(cfg.TrustDomain); err != nil {
		return nil, err
	}
	n.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		version.Collector("agent"))
	if n.metrics, err = admin.NewMetrics(n.reg, cfg.AccessLog); err != nil {
		return nil, fmt.Errorf("registering metrics: %w", err)
	}
	n.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nodemesh_state_version",
		Help: "Version of the agent's cluster state snapshot."}, func() float64 { return float64(n.store.Snapshot().Version()) }))
	srcName := "api-server"
	if cfg.StaticDir != "" {
		srcName = "static:" + cfg.StaticDir
		n.source = &k8s.Static{Dir: cfg.StaticDir, Store: n.store, Log: n.log.With("component", "state")}
	} else {
		if cfg.Rest == nil {
			return nil, errors.New("creating the node agent: Config.Rest or StaticDir is required")
		}
		rc := rest.CopyConfig(cfg.Rest)
		rc.UserAgent = "nodemesh-agent/" + cfg.NodeName
		if n.client, err = apiclient.New(rc); err != nil {
			return nil, fmt.Errorf("creating Kubernetes client: %w", err)
		}
		if n.dynamic, err = dynamic.NewForConfig(rc); err != nil {
			return nil, fmt.Errorf("creating Kubernetes dynamic client: %w", err)
		}
		n.source = &k8s.Informers{Client: n.client, Dynamic: n.dynamic, Store: n.store, Log: n.log.With("component", "state"),
			CRDRecheck: cfg.CRDRecheck, Node: cfg.NodeName}
	}
	if n.admin, err = admin.New(admin.Config{
		AdminAddr: cfg.AdminAddr, MetricsAddr: cfg.MetricsAddr, ReadinessAddr: cfg.ReadinessAddr,
		Logger: n.log.With("component", "admin"), Level: cfg.Level, Gatherer: n.reg, Registerer: n.reg,
		MetricsAllow: scrapersAllowed(n.store, cfg.MetricsScrapers),
		Info: map[string]string{"node": cfg.NodeName, "trustDomain": cfg.TrustDomain.Name(), "stateSource": srcName,
			"dataplane": fmt.Sprint(cfg.Dataplane), "version": version.String(), "kernel": kernelRelease()},
	}); err != nil {
		return nil, err
	}
	n.admin.AddReadiness("state", func(context.Context) error {
		if snap := n.store.Snapshot(); !snap.Synced() {
			return fmt.Errorf("cluster state not synced yet (source %s)", srcName)
		}
		return nil
	})
	n.admin.AddReadiness("lifecycle", func(context.Context) error {
		if n.draining.Load() {
			return errors.New("draining: the agent is shutting down")
		}
		return nil
	})
	if cfg.Dataplane {
		// Until the mesh has registered its own checks (SVIDs, capture),
		// the agent must not look ready.
		n.admin.AddReadiness("dataplane", func(context.Context) error {
			if !n.meshUp.Load() {
				return errors.New("starting the data plane (loading capture, creating the proxy)")
			}
			return nil
		})
	}
	addStateDumps(n.admin, n.store, cfg.NodeName)
	if err := n.setupRollout(); err != nil {
		return nil, err
	}
	if cfg.Dataplane {
		if n.ledger, err = exposure.New(exposure.Config{Node: cfg.NodeName, Registerer: n.reg}); err != nil {
			return nil, err
		}
		n.admin.Handle(exposure.Path, exposure.Handler(n.ledger))
	}
	return n, nil
}

// Run starts everything and blocks until ctx ends or a part fails; then it
// drains and stops in order.
func (n *Node) Run(ctx context.Context) error {
	// Deferred in this order so that on every return the background
	// context is cancelled first, then its goroutines are waited for.
	var wg sync.WaitGroup
	defer wg.Wait()
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	errc := make(chan error, 4)
	goRun := func(name string, f func(context.Context) error) {
		wg.Go(func() {
			if err := f(bg); err != nil && bg.Err() == nil {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		})
	}
	switch {
	case n.cfg.Procs == ProcsAuto:
		wg.Go(func() { procs.Run(bg, procs.DefaultPolicy(runtime.GOMAXPROCS(0)), procsInterval, n.log) })
	case n.cfg.Procs > 0:
		runtime.GOMAXPROCS(n.cfg.Procs)
	}
	goRun("admin", n.admin.Run)
	goRun("cluster state", n.source.Run)
	if n.peers != nil {
		goRun("node marks", n.peers.Run)
	}
	// The mark has its own context: it is withdrawn as the drain starts,
	// so peers stop opening tunnels to this node.
	var markWG sync.WaitGroup
	markCtx, withdraw := context.WithCancel(bg)
	defer withdraw()
	if n.mark != nil {
		markWG.Go(func() {
			if err := n.mark.Run(markCtx); err != nil {
				n.log.Warn("node mark", "err", err)
			}
		})
	}

	// The mesh's loop has its own context: it stops (no more enrollments)
	// before the data plane is closed.
	var meshWG sync.WaitGroup
	meshCtx, stopMesh := context.WithCancel(bg)
	defer stopMesh()
	var m *mesh
	if n.cfg.Dataplane {
		var err error
		if m, err = n.newMesh(ctx); err != nil {
			return err
		}
		// The CNI plugin's socket (agent/cni), stopped with the mesh: it
		// goes away before the data plane closes, and the plugin fails
		// closed until the next agent listens.
		var (
			srv *cni.Server
			ln  *net.UnixListener
		)
		if n.cfg.CNISocket != "" {
			if srv, err = cni.NewServer(cni.ServerConfig{Path: n.cfg.CNISocket, Enroller: m, Log: n.log.With("component", "cni")}); err == nil {
				ln, err = srv.Listen()
			}
			if err != nil {
				if cerr := m.close(); cerr != nil {
					n.log.Warn("closing the data plane", "err", cerr)
				}
				return err
			}
		}
		n.meshUp.Store(true)
		meshWG.Go(func() {
			if err := m.run(meshCtx); err != nil && meshCtx.Err() == nil {
				errc <- fmt.Errorf("data plane: %w", err)
			}
		})
		if srv != nil {
			meshWG.Go(func() {
				if err := srv.Serve(meshCtx, ln); err != nil && meshCtx.Err() == nil {
					errc <- fmt.Errorf("CNI plugin socket: %w", err)
				}
			})
			meshWG.Go(func() {
				keepNamespaceTable(meshCtx, n.store, cni.NamespaceTablePath(n.cfg.CNISocket), n.log.With("component", "cni"))
			})
		}
		if ic := n.cfg.CNIInstall; ic != nil {
			// Left in place when the agent stops (a restart must not let
			// pods start uncaptured); removed by the uninstall
			// (nodemesh-agent cni-uninstall).
			icfg := *ic
			icfg.Log = n.log.With("component", "cni")
			wg.Go(func() { cni.KeepInstalled(bg, icfg, cniRecheck) })
		}
	} else {
		n.log.Warn("data plane off (--dataplane=false): no capture, no SVIDs, no proxying")
	}

	n.log.Info("agent started", "version", version.String(), "trust_domain", n.cfg.TrustDomain.Name(), "dataplane", n.cfg.Dataplane)
	var runErr error
	select {
	case <-ctx.Done():
		n.log.Info("shutting down", "drain_deadline", n.cfg.DrainDeadline)
	case runErr = <-errc:
		n.log.Error("a component failed; shutting down", "err", runErr)
	}
	n.draining.Store(true)
	withdraw()
	markWG.Wait()
	// No enrollments from here on: nothing new starts accepting while the
	// rest drains.
	stopMesh()
	meshWG.Wait()
	if m != nil {
		dctx, cancel := context.WithTimeout(context.Background(), n.cfg.DrainDeadline)
		start := time.Now()
		if err := m.dp.Drain(dctx); err != nil {
			n.log.Warn("drain ended with connections cut", "err", err, "after", time.Since(start).Round(time.Millisecond))
		} else {
			n.log.Info("drained", "after", time.Since(start).Round(time.Millisecond))
		}
		cancel()
		if err := m.close(); err != nil {
			n.log.Warn("closing the data plane", "err", err)
		}
	}
	stopBG()
	wg.Wait()
	n.log.Info("agent stopped")
	return runErr
}

// setupRollout creates the node mark (with a data plane: only an agent that
// terminates tunnels may claim its node) and the peers' view. Without an
// API server there is neither, and every enrolled pod is assumed to have
// an agent, as before partial rollouts.
func (n *Node) setupRollout() error {
	if n.client == nil {
		return nil
	}
	n.peers = rollout.NewPeers(n.client, rollout.DefaultNamespace)
	n.admin.AddDump("rollout", n.rolloutDump)
	if !n.cfg.Dataplane || len(n.cfg.OnlyPods) > 0 {
		return nil
	}
	// The holder is the node name (--node-name), which the admission
	// policy nodemesh-agent-lease-holder accepts. Not os.Hostname(): with
	// the host network that is the node's hostname, which differs from the
	// node name under kubelet's --hostname-override.
	m, err := rollout.NewMark(rollout.MarkConfig{Client: n.client, Node: n.cfg.NodeName, Holder: n.cfg.NodeName,
		Duration: n.cfg.MarkDuration, Renew: n.cfg.MarkRenew, Ready: n.terminatesTunnels, Log: n.log.With("component", "rollout")})
	if err != nil {
		return err
	}
	n.mark = m
	return nil
}

// terminatesTunnels is what the node mark claims: the cluster state is
// synced, the data plane is up and the agent is not draining. It is
// coarser than the readiness probe on purpose: a pod still being enrolled
// makes the probe fail, but must not withdraw the mark for the node's other
// pods (a peer's tunnel to a pod not yet captured fails closed).
func (n *Node) terminatesTunnels(context.Context) bool {
	return n.store.Snapshot().Synced() && n.meshUp.Load() && !n.draining.Load()
}

// meshCapable reports whether node has an agent ready to terminate
// tunnels. This node counts (its pods are served by this agent); before the
// peers' first list, and without an API server, every node counts, so an
// enrolled destination is tried over HBONE and fails closed rather than
// being downgraded.
func (n *Node) meshCapable(node string) bool {
	if n.peers == nil || !n.peers.Synced() || node == n.cfg.NodeName {
		return true
	}
	return n.peers.Capable(node)
}

// rolloutDumpT is the "rollout" section of the config dump.
type rolloutDumpT struct {
	Node   string               `json:"node"`
	Synced bool                 `json:"synced"`
	Marks  []rollout.NodeStatus `json:"marks"`
	// Unprotected are enrolled pods whose node has no fresh mark.
	Unprotected []string `json:"unprotectedPods"`
}

func (n *Node) rolloutDump() any {
	d := rolloutDumpT{Node: n.cfg.NodeName, Synced: n.peers.Synced(), Marks: n.peers.Nodes(), Unprotected: []string{}}
	if d.Marks == nil {
		d.Marks = []rollout.NodeStatus{}
	}
	for _, p := range n.store.Snapshot().Pods() {
		if p.Enrolled && !p.HostNetwork && !n.meshCapable(p.Node) {
			d.Unprotected = append(d.Unprotected, p.Namespace+"/"+p.Name+" (node "+p.Node+")")
		}
	}
	return d
}

// kernelRelease is the node's kernel release (uname -r), shown in /status
// for `nodemeshctl check`.
func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// scrapersAllowed admits metrics scrapes from the pods of the named
// service accounts (--metrics-scrapers), by source IP in the cluster state.
func scrapersAllowed(store *state.Store, scrapers []string) func(netip.Addr) bool {
	if len(scrapers) == 0 {
		return nil
	}
	return func(ip netip.Addr) bool {
		p := store.Snapshot().PodByIP(ip)
		return p != nil && !p.HostNetwork && slices.Contains(scrapers, p.Namespace+"/"+p.ServiceAccount)
	}
}
