package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/exposure"
	"github.com/nodemesh/nodemesh/agent/k8s"
	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/version"
)

func newAccessLog(w io.Writer) *slog.Logger { return admin.NewAccessLog(w) }

// agent owns every long-running part and shuts them down in order.
type agent struct {
	cfg     *Config
	log     *slog.Logger
	level   *slog.LevelVar
	store   *state.Store
	reg     *prometheus.Registry
	metrics *admin.Metrics
	admin   *admin.Server

	client  kubernetes.Interface // nil with --static-dir
	dynamic dynamic.Interface
	source  interface{ Run(context.Context) error }

	// Partial rollouts (agent/rollout): nil without an API server; mark
	// also nil without a data plane.
	peers *rollout.Peers
	mark  *rollout.Mark
	// ledger: plaintext exposure (agent/exposure); nil without a data plane.
	ledger *exposure.Ledger

	draining atomic.Bool
	dp       *dataplane // nil with --dataplane=false
	dpUp     atomic.Bool
}

func restConfig(cfg *Config) (*rest.Config, error) {
	if cfg.InCluster {
		rc, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("loading the in-cluster Kubernetes configuration (outside a pod, pass --kubeconfig or --static-dir): %w", err)
		}
		return rc, nil
	}
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading kubeconfig %s: %w", cfg.Kubeconfig, err)
	}
	return rc, nil
}

func newAgent(cfg *Config, log *slog.Logger, level *slog.LevelVar, access *slog.Logger) (*agent, error) {
	a := &agent{cfg: cfg, log: log, level: level, reg: prometheus.NewRegistry()}
	var err error
	if a.store, err = state.NewStore(cfg.td); err != nil {
		return nil, err
	}
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		version.Collector("agent"))
	if a.metrics, err = admin.NewMetrics(a.reg, access); err != nil {
		return nil, fmt.Errorf("registering metrics: %w", err)
	}
	a.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nodemesh_state_version",
		Help: "Version of the agent's cluster state snapshot."}, func() float64 { return float64(a.store.Snapshot().Version()) }))
	srcName := "api-server"
	if cfg.StaticDir != "" {
		srcName = "static:" + cfg.StaticDir
		a.source = &k8s.Static{Dir: cfg.StaticDir, Store: a.store, Log: log.With("component", "state")}
	} else {
		rc, err := restConfig(cfg)
		if err != nil {
			return nil, err
		}
		rc.UserAgent = "nodemesh-agent/" + cfg.NodeName
		if a.client, err = kubernetes.NewForConfig(rc); err != nil {
			return nil, fmt.Errorf("creating Kubernetes client: %w", err)
		}
		if a.dynamic, err = dynamic.NewForConfig(rc); err != nil {
			return nil, fmt.Errorf("creating Kubernetes dynamic client: %w", err)
		}
		a.source = &k8s.Informers{Client: a.client, Dynamic: a.dynamic, Store: a.store, Log: log.With("component", "state"), CRDRecheck: cfg.CRDRecheck}
	}
	if a.admin, err = admin.New(admin.Config{
		AdminAddr: cfg.AdminAddr, MetricsAddr: cfg.MetricsAddr, ReadinessAddr: cfg.ReadinessAddr,
		Logger: log.With("component", "admin"), Level: level, Gatherer: a.reg, Registerer: a.reg,
		MetricsAllow: scrapersAllowed(a.store, cfg.MetricsScrapers),
		Info: map[string]string{"node": cfg.NodeName, "trustDomain": cfg.TrustDomain, "stateSource": srcName,
			"dataplane": fmt.Sprint(cfg.Dataplane), "version": version.String(), "kernel": kernelRelease()},
	}); err != nil {
		return nil, err
	}
	a.admin.AddReadiness("state", func(context.Context) error {
		if snap := a.store.Snapshot(); !snap.Synced() {
			return fmt.Errorf("cluster state not synced yet (source %s)", srcName)
		}
		return nil
	})
	a.admin.AddReadiness("lifecycle", func(context.Context) error {
		if a.draining.Load() {
			return errors.New("draining: the agent is shutting down")
		}
		return nil
	})
	if cfg.Dataplane {
		// Until the data plane has registered its own checks (SVIDs,
		// capture), the agent must not look ready.
		a.admin.AddReadiness("dataplane", func(context.Context) error {
			if !a.dpUp.Load() {
				return errors.New("starting the data plane (loading capture, creating the proxy)")
			}
			return nil
		})
	}
	addStateDumps(a.admin, a.store, cfg.NodeName)
	if err := a.setupRollout(); err != nil {
		return nil, err
	}
	if err := a.setupExposure(); err != nil {
		return nil, err
	}
	return a, nil
}

// run starts everything and blocks until ctx ends; then it drains and
// stops in order: unready, stop accepting, drain until the deadline, stop
// the data plane (leaving capture pinned), stop the state source and the
// admin servers.
func (a *agent) run(ctx context.Context) error {
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
	goRun("admin", a.admin.Run)
	goRun("cluster state", a.source.Run)
	if a.peers != nil {
		goRun("node marks", a.peers.Run)
	}
	// The mark has its own context: it is withdrawn as the drain starts,
	// so peers stop opening tunnels to this node.
	var markWG sync.WaitGroup
	markCtx, withdraw := context.WithCancel(bg)
	defer withdraw()
	if a.mark != nil {
		markWG.Go(func() {
			if err := a.mark.Run(markCtx); err != nil {
				a.log.Warn("node mark", "err", err)
			}
		})
	}

	// The data plane's loop has its own context: it stops (no more
	// enrollments) before the data plane is closed.
	var dpWG sync.WaitGroup
	dpCtx, stopDP := context.WithCancel(bg)
	defer stopDP()
	if a.cfg.Dataplane {
		dp, err := newDataplane(ctx, a)
		if err != nil {
			return err
		}
		a.dp = dp
		a.dpUp.Store(true)
		dpWG.Go(func() {
			if err := dp.run(dpCtx); err != nil && dpCtx.Err() == nil {
				errc <- fmt.Errorf("data plane: %w", err)
			}
		})
	} else {
		a.log.Warn("data plane off (--dataplane=false): no capture, no SVIDs, no proxying")
	}

	a.log.Info("agent started", "version", version.String(), "trust_domain", a.cfg.TrustDomain, "dataplane", a.cfg.Dataplane)
	var runErr error
	select {
	case <-ctx.Done():
		a.log.Info("shutting down", "drain_deadline", a.cfg.DrainDeadline)
	case runErr = <-errc:
		a.log.Error("a component failed; shutting down", "err", runErr)
	}
	a.draining.Store(true)
	withdraw()
	markWG.Wait()
	// No enrollments from here on: nothing new starts accepting while the
	// rest drains.
	stopDP()
	dpWG.Wait()
	if a.dp != nil {
		dctx, cancel := context.WithTimeout(context.Background(), a.cfg.DrainDeadline)
		start := time.Now()
		if err := a.dp.drain(dctx); err != nil {
			a.log.Warn("drain ended with connections cut", "err", err, "after", time.Since(start).Round(time.Millisecond))
		} else {
			a.log.Info("drained", "after", time.Since(start).Round(time.Millisecond))
		}
		cancel()
		if err := a.dp.close(); err != nil {
			a.log.Warn("closing the data plane", "err", err)
		}
	}
	stopBG()
	wg.Wait()
	a.log.Info("agent stopped")
	return runErr
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
