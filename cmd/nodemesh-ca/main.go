// Command nodemesh-ca is nodemesh's certificate authority. It signs X.509
// SVIDs for node agents over HTTPS (port 15012), authorizing each request
// by the agent's service-account token (TokenReview) and the pods scheduled
// on the agent's node, and publishes the trust bundle in a ConfigMap.
//
// Its root is generated on first start and kept in a Secret (--root-secret),
// or taken from a user-provided, cert-manager-shaped Secret (--ca-secret:
// tls.crt, tls.key, optional ca.crt) and used as an intermediate. A
// generated root is rotated automatically with an overlap window when it
// reaches --rotate-at of its lifetime. SIGTERM stops it gracefully.
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nodemesh/nodemesh/agent/version"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/identity/ca"
)

// Config is everything nodemesh-ca needs, from flags (and the downward-API
// environment for the namespace).
type Config struct {
	Listen              string
	TrustDomain         string
	SVIDTTL             time.Duration
	Namespace           string
	ServiceAccount      string
	AgentServiceAccount string // namespace/name
	CASecret            string
	RootSecret          string
	RootTTL             time.Duration
	RotateAt            float64
	Propagation         time.Duration
	BundleConfigMap     string
	DNSNames            []string
	Kubeconfig          string
	LogLevel            string
	MetricsAddr         string
	MaxInFlight         int
	MaxPerCaller        int
	MaxConnsPerCaller   int

	// Derived by Validate.
	td               spiffeid.TrustDomain
	servingID        spiffeid.ID
	agentNS, agentSA string
	level            slog.Level
}

func parseFlags(args []string) (*Config, error) {
	c := &Config{}
	var dns string
	fs := flags(c, &dns, os.Getenv)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if dns != "" {
		c.DNSNames = strings.Split(dns, ",")
	} else {
		c.DNSNames = []string{"nodemesh-ca." + c.Namespace + ".svc", "nodemesh-ca." + c.Namespace + ".svc.cluster.local"}
	}
	return c, nil
}

// flags defines the CA's flags on c (and dns, the raw --dns-names), with
// defaults from getenv where Kubernetes convention wants them
// (docs/install.md lists them; a test keeps that table in step).
func flags(c *Config, dns *string, getenv func(string) string) *flag.FlagSet {
	fs := flag.NewFlagSet("nodemesh-ca", flag.ContinueOnError)
	ns := getenv("POD_NAMESPACE")
	if ns == "" {
		ns = "nodemesh-system"
	}
	fs.StringVar(&c.Listen, "listen", fmt.Sprintf(":%d", identity.DefaultPort), "HTTPS listen address")
	fs.StringVar(&c.TrustDomain, "trust-domain", identity.DefaultTrustDomain, "SPIFFE trust domain")
	fs.DurationVar(&c.SVIDTTL, "svid-ttl", time.Hour, "lifetime of issued SVIDs")
	fs.StringVar(&c.Namespace, "namespace", ns, "namespace of the CA (Secrets, bundle ConfigMap); default $POD_NAMESPACE")
	fs.StringVar(&c.ServiceAccount, "service-account", "nodemesh-ca", "the CA's service account; its SPIFFE ID is in the serving certificate and agents require it")
	fs.StringVar(&c.AgentServiceAccount, "agent-service-account", "nodemesh-system/nodemesh-agent", "namespace/name of the only service account allowed to request SVIDs")
	fs.StringVar(&c.CASecret, "ca-secret", "", "Secret (in --namespace) with a user-provided CA: tls.crt, tls.key, optional ca.crt; empty = generate a root")
	fs.StringVar(&c.RootSecret, "root-secret", "nodemesh-ca-root", "Secret (in --namespace) that keeps the generated root")
	fs.DurationVar(&c.RootTTL, "root-ttl", 365*24*time.Hour, "lifetime of a generated root")
	fs.Float64Var(&c.RotateAt, "rotate-at", 0.66, "rotate a generated root when this fraction of its lifetime has passed")
	fs.DurationVar(&c.Propagation, "rotation-propagation", 2*time.Minute, "during rotation, trust the new root this long before signing with it")
	fs.StringVar(&c.BundleConfigMap, "bundle-configmap", identity.BundleConfigMap, "ConfigMap (in --namespace) the trust bundle is published to")
	fs.StringVar(dns, "dns-names", "", "comma-separated DNS names for the serving certificate; default nodemesh-ca.<namespace>.svc[.cluster.local]")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig file; empty = in-cluster config")
	fs.StringVar(&c.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", "", "plain-HTTP address for Prometheus /metrics (e.g. :15014); empty = off")
	fs.IntVar(&c.MaxInFlight, "max-in-flight", 64, "concurrent authenticated sign requests before new ones get 503")
	fs.IntVar(&c.MaxPerCaller, "max-requests-per-caller", 64, "concurrent requests from one source address before new ones get 503 (per-pod agents on one node share its address)")
	fs.IntVar(&c.MaxConnsPerCaller, "max-conns-per-caller", 128, "open connections from one source address before new ones are closed")
	return fs
}

// Validate checks the config once and fills the derived fields.
func (c *Config) Validate() error {
	var errs []error
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		errs = append(errs, fmt.Errorf("--trust-domain %q: %w", c.TrustDomain, err))
	}
	c.td = td
	if err == nil {
		if c.servingID, err = identity.WorkloadID(td, c.Namespace, c.ServiceAccount); err != nil {
			errs = append(errs, fmt.Errorf("--namespace/--service-account: %w", err))
		}
	}
	if c.SVIDTTL < time.Minute || c.SVIDTTL > 30*24*time.Hour {
		errs = append(errs, fmt.Errorf("--svid-ttl %s: must be between 1m and 720h", c.SVIDTTL))
	}
	ns, sa, ok := strings.Cut(c.AgentServiceAccount, "/")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, "/") {
		errs = append(errs, fmt.Errorf("--agent-service-account %q: want namespace/name", c.AgentServiceAccount))
	}
	c.agentNS, c.agentSA = ns, sa
	if c.RootTTL < 10*c.SVIDTTL {
		errs = append(errs, fmt.Errorf("--root-ttl %s: must be at least 10 × --svid-ttl (%s) so rotation has room", c.RootTTL, c.SVIDTTL))
	}
	if c.RotateAt <= 0 || c.RotateAt >= 1 {
		errs = append(errs, fmt.Errorf("--rotate-at %.2f: must be between 0 and 1", c.RotateAt))
	}
	if c.Propagation < 0 {
		errs = append(errs, fmt.Errorf("--rotation-propagation %s: negative", c.Propagation))
	}
	if c.RootSecret == "" || c.BundleConfigMap == "" {
		errs = append(errs, errors.New("--root-secret and --bundle-configmap must not be empty"))
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("--listen %q: %w", c.Listen, err))
	}
	if c.MaxInFlight <= 0 {
		errs = append(errs, fmt.Errorf("--max-in-flight %d: must be positive", c.MaxInFlight))
	}
	if c.MaxPerCaller <= 0 || c.MaxConnsPerCaller <= 0 {
		errs = append(errs, fmt.Errorf("--max-requests-per-caller %d and --max-conns-per-caller %d: must be positive", c.MaxPerCaller, c.MaxConnsPerCaller))
	}
	if c.MetricsAddr != "" {
		if _, _, err := net.SplitHostPort(c.MetricsAddr); err != nil {
			errs = append(errs, fmt.Errorf("--metrics-addr %q: %w", c.MetricsAddr, err))
		}
	}
	if err := c.level.UnmarshalText([]byte(c.LogLevel)); err != nil {
		errs = append(errs, fmt.Errorf("--log-level %q: %w", c.LogLevel, err))
	}
	return errors.Join(errs...)
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "nodemesh-ca: %v\n", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	rc, err := restConfig(cfg.Kubeconfig)
	if err == nil {
		err = run(ctx, cfg, rc, nil, log)
	}
	if err != nil {
		log.Error("nodemesh-ca failed", "error", err)
		os.Exit(1)
	}
	log.Info("nodemesh-ca stopped")
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("loading in-cluster Kubernetes config (or pass --kubeconfig): %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading kubeconfig %s: %w", kubeconfig, err)
	}
	return c, nil
}

// run serves until ctx ends. ready, if not nil, receives the listen address
// once serving.
func run(ctx context.Context, cfg *Config, rc *rest.Config, ready chan<- string, log *slog.Logger) error {
	kc, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("creating Kubernetes client: %w", err)
	}
	now := time.Now()
	var signer *ca.Signer
	var roots []*x509.Certificate
	store := ca.SecretStore{Client: kc, Namespace: cfg.Namespace, Name: cfg.RootSecret}
	if cfg.CASecret != "" {
		signer, roots, err = ca.LoadProvidedSigner(ctx, kc, cfg.Namespace, cfg.CASecret, now)
	} else {
		signer, roots, err = ca.LoadOrCreateRoot(ctx, store, cfg.td, cfg.RootTTL, now)
	}
	if err != nil {
		return err
	}
	auth, err := ca.NewAuthority(ca.AuthorityConfig{TrustDomain: cfg.td, Signer: signer, ExtraRoots: roots, TTL: cfg.SVIDTTL})
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := ca.NewMetrics(reg)
	authn, err := ca.NewKubeAuthenticator(ca.KubeAuthenticatorConfig{Client: kc, AgentNamespace: cfg.agentNS, AgentServiceAccount: cfg.agentSA, Metrics: metrics})
	if err != nil {
		return err
	}
	srv, err := ca.NewServer(ca.ServerConfig{
		Authority: auth, Authn: authn, Pods: ca.KubePods{Client: kc}, Log: log, Metrics: metrics,
		ServingID: cfg.servingID, DNSNames: cfg.DNSNames, Version: version.String(),
		MaxInFlight: cfg.MaxInFlight, MaxPerCaller: cfg.MaxPerCaller, MaxConnsPerCaller: cfg.MaxConnsPerCaller,
	})
	if err != nil {
		return err
	}
	persist := func(ctx context.Context, s *ca.Signer, roots []*x509.Certificate) error {
		if cfg.CASecret == "" {
			if err := store.Save(ctx, s, roots); err != nil {
				return err
			}
		}
		return ca.PublishBundle(ctx, kc, cfg.Namespace, cfg.BundleConfigMap, roots)
	}
	rot := ca.RotationConfig{Propagation: cfg.Propagation, Persist: persist, Log: log}

	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if cfg.MetricsAddr != "" {
		mln, err := lc.Listen(ctx, "tcp", cfg.MetricsAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("listening for metrics on %s: %w", cfg.MetricsAddr, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveMetrics(ctx, mln, reg, log)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		// Publishing retries until it succeeds; until then agents that have
		// no bundle cannot reach the CA, which fails closed.
		if err := auth.Persist(ctx, rot); err != nil {
			return
		}
		if cfg.CASecret == "" && len(auth.Bundle()) > 1 {
			// A rotation was interrupted by a restart: finish it once every
			// SVID the other root may have signed has expired.
			log.Info("finishing an interrupted root rotation", "roots", len(auth.Bundle()))
			if err := auth.RetireRoots(ctx, cfg.SVIDTTL+5*time.Minute, rot); err != nil && ctx.Err() == nil {
				log.Error("retiring old roots", "error", err)
			}
		}
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		if cfg.CASecret == "" {
			autoRotate(ctx, cfg, auth, rot, log)
		} else {
			followProvided(ctx, cfg, kc, auth, rot, time.Minute, log)
		}
	}()
	log.Info("nodemesh-ca serving", "version", version.String(), "addr", ln.Addr().String(), "trust_domain", cfg.td.String(), "spiffe_id", cfg.servingID.String(),
		"root", signer.Root.Subject.String(), "root_expires", signer.Root.NotAfter, "svid_ttl", cfg.SVIDTTL)
	if ready != nil {
		ready <- ln.Addr().String()
	}
	return srv.Serve(ctx, ln)
}

// serveMetrics serves /metrics on ln until ctx ends. It carries no
// secrets (counts and refusal codes, no identities), is plain HTTP like
// istiod's 15014, and has its own small limits.
func serveMetrics(ctx context.Context, ln net.Listener, g prometheus.Gatherer, log *slog.Logger) {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{MaxRequestsInFlight: 4, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 8 << 10}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		log.Error("serving metrics stopped", "error", err)
		return
	case <-ctx.Done():
	}
	_ = hs.Close()
	<-errc
}

// followProvided picks up a renewed user-provided CA (cert-manager renews
// the Secret in place): it checks the Secret every interval and rotates to
// a changed signer, with the overlap window when the root changes too.
func followProvided(ctx context.Context, cfg *Config, kc kubernetes.Interface, a *ca.Authority, rot ca.RotationConfig, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := checkProvided(ctx, cfg, kc, a, rot); err != nil && ctx.Err() == nil {
			log.Error("following the provided CA Secret", "secret", cfg.Namespace+"/"+cfg.CASecret, "error", err)
		}
	}
}

func checkProvided(ctx context.Context, cfg *Config, kc kubernetes.Interface, a *ca.Authority, rot ca.RotationConfig) error {
	next, extra, err := ca.LoadProvidedSigner(ctx, kc, cfg.Namespace, cfg.CASecret, time.Now())
	if err != nil {
		return fmt.Errorf("%w (still signing with the previous CA)", err)
	}
	if cur := a.ActiveSigner(); cur.Cert.Equal(next.Cert) {
		return nil
	}
	for _, r := range extra {
		a.TrustRoot(r)
	}
	rot.Log.Info("provided CA changed; rotating", "new_ca", next.Cert.Subject.String(), "new_root", next.Root.Subject.String())
	return a.Rotate(ctx, next, rot)
}

// autoRotate rotates a generated root once it is RotateAt through its life.
func autoRotate(ctx context.Context, cfg *Config, a *ca.Authority, rot ca.RotationConfig, log *slog.Logger) {
	for {
		root := a.ActiveSigner().Root
		life := root.NotAfter.Sub(root.NotBefore)
		at := root.NotBefore.Add(time.Duration(float64(life) * cfg.RotateAt))
		t := time.NewTimer(time.Until(at))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		next, err := ca.NewRootSigner(cfg.td, cfg.RootTTL, time.Now())
		if err != nil {
			log.Error("root rotation: generating new root; retrying in 1m", "error", err)
			t := time.NewTimer(time.Minute)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		if err := a.Rotate(ctx, next, rot); err != nil {
			log.Error("root rotation interrupted", "error", err)
			return
		}
	}
}
