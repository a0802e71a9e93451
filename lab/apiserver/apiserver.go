// Package apiserver runs a real Kubernetes API server for the lab and the
// tests: Debian's etcd plus a kube-apiserver built from the k8s.io/kubernetes
// Go module (see lab/kube-apiserver), both on loopback.
//
// There is no controller manager and no kubelet: callers create Nodes,
// ServiceAccounts, Pods, EndpointSlices and Pod status themselves. The server
// is configured for service-account tokens (TokenRequest/TokenReview) and
// Node,RBAC authorization, so RBAC mistakes show up as they would on a real
// cluster.
package apiserver

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// KubernetesVersion is the k8s.io/kubernetes module version the lab builds.
// Keep it equal to the require line in lab/kube-apiserver/go.mod.
const KubernetesVersion = "v1.34.2"

// BinaryEnv overrides where the kube-apiserver binary is taken from.
const BinaryEnv = "NODEMESH_KUBE_APISERVER"

// DefaultServiceCIDR is the ClusterIP range the API server allocates from.
const DefaultServiceCIDR = "10.96.0.0/16"

// Issuer is the service-account token issuer of the lab API server.
const Issuer = "https://kubernetes.default.svc.cluster.local"

// Config says how to start a Server.
type Config struct {
	// Dir holds certificates, keys, etcd data, logs and pid files. Created if
	// missing. Required.
	Dir string
	// Binary is the kube-apiserver path; empty means Binary(ctx).
	Binary string
	// Etcd is the etcd path; empty means "etcd" from PATH.
	Etcd string
	// ServiceCIDR defaults to DefaultServiceCIDR.
	ServiceCIDR string
	// Detach leaves etcd and kube-apiserver running when the calling process
	// exits (for `nodemeshctl lab up`); Stop or Sweep ends them. Without it
	// they die with the caller.
	Detach bool
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// KubeletEgress, when set, is a Unix socket through which the API server
	// reaches kubelets (its "cluster" egress, HTTP CONNECT, as with
	// konnectivity): the lab serves the kubelet API there, so that
	// pods/portforward works. The socket may appear after Start.
	KubeletEgress string
	// BindAddress is the address the API server listens on and advertises;
	// "" means 127.0.0.1 with no endpoint reconciler (the lab writes the
	// kubernetes Service's endpoints itself, if at all). Any other address
	// is added to the serving certificate and the API server keeps the
	// kubernetes Service's endpoints pointing at it, as on a real cluster
	// (lab/cluster: kubelets and pods reach it from other namespaces).
	BindAddress string
	// Tokens are more static bearer tokens, for the kubelets and
	// controllers of lab/cluster.
	Tokens []Token
}

// Token is a line of the API server's static token file: a bearer token
// that authenticates as User (with UID) in Groups.
type Token struct {
	Token, User, UID string
	Groups           []string
}

// KubeletPort is the port the API server expects kubelets on (it is put
// in each lab Node's status).
const KubeletPort = 10250

// Server is a running etcd + kube-apiserver pair.
type Server struct {
	Dir         string
	URL         string // https://127.0.0.1:<port>
	Kubeconfig  string // admin kubeconfig file
	CAFile      string // PEM of the CA that signed the serving certificate
	REST        *rest.Config
	Client      kubernetes.Interface
	ServiceCIDR string
	Issuer      string

	caPEM []byte
	procs []*exec.Cmd
}

// CachePath is where Binary keeps the kube-apiserver build for this version.
func CachePath() (string, error) {
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("finding the user cache directory: %w", err)
	}
	return filepath.Join(dir, "nodemesh", "kube-apiserver-"+KubernetesVersion, "kube-apiserver"), nil
}

// Binary returns a kube-apiserver binary: $NODEMESH_KUBE_APISERVER if set,
// else the cached build, building it (a few minutes) when it is missing.
func Binary(ctx context.Context) (string, error) {
	if p := os.Getenv(BinaryEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", BinaryEnv, p, err)
		}
		return p, nil
	}
	out, err := CachePath()
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	src, err := sourceDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", fmt.Errorf("creating the kube-apiserver cache directory: %w", err)
	}
	// Serialise concurrent builds (test packages run in parallel).
	lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("opening the build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("locking the kube-apiserver build: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	tmp := out + ".tmp"
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building kube-apiserver %s in %s: %w\n%s", KubernetesVersion, src, err, tail(b, 4000))
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", fmt.Errorf("installing the kube-apiserver build: %w", err)
	}
	return out, nil
}

// sourceDir finds lab/kube-apiserver next to this file's source.
func sourceDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if ok {
		d := filepath.Join(filepath.Dir(file), "..", "kube-apiserver")
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
	}
	return "", fmt.Errorf("kube-apiserver is not built and its source (lab/kube-apiserver) is not here: run `make kube-apiserver` in a nodemesh checkout or set %s", BinaryEnv)
}

// Start brings up etcd and kube-apiserver on free loopback ports and waits
// until the API server reports ready.
func Start(ctx context.Context, cfg Config) (_ *Server, err error) {
	if cfg.Dir == "" {
		return nil, errors.New("apiserver: Config.Dir is required")
	}
	logw := cfg.Log
	if logw == nil {
		logw = io.Discard
	}
	if cfg.ServiceCIDR == "" {
		cfg.ServiceCIDR = DefaultServiceCIDR
	}
	if cfg.Etcd == "" {
		cfg.Etcd = "etcd"
	}
	if cfg.Binary == "" {
		if cfg.Binary, err = Binary(ctx); err != nil {
			return nil, err
		}
	}
	etcdPath, err := exec.LookPath(cfg.Etcd)
	if err != nil {
		return nil, fmt.Errorf("finding etcd (install Debian's etcd-server): %w", err)
	}
	// A previous run in the same directory may have been killed.
	Sweep(cfg.Dir)
	if err := os.RemoveAll(filepath.Join(cfg.Dir, "etcd")); err != nil {
		return nil, fmt.Errorf("removing old etcd data: %w", err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", cfg.Dir, err)
	}
	s := &Server{Dir: cfg.Dir, ServiceCIDR: cfg.ServiceCIDR, Issuer: Issuer}
	defer func() {
		if err != nil {
			s.Stop() //nolint:errcheck
		}
	}()

	bind := cfg.BindAddress
	if bind == "" {
		bind = "127.0.0.1"
	}
	bindIP := net.ParseIP(bind)
	if bindIP == nil || bindIP.To4() == nil {
		return nil, fmt.Errorf("apiserver: BindAddress %q is not an IPv4 address", bind)
	}
	for _, t := range cfg.Tokens {
		if t.Token == "" || t.User == "" || strings.ContainsAny(t.Token+t.User+t.UID+strings.Join(t.Groups, ""), ",\"\n") {
			return nil, fmt.Errorf("apiserver: token for %q is empty or has a comma, quote or newline", t.User)
		}
	}
	token, err := s.writeCredentials(bindIP, cfg.Tokens)
	if err != nil {
		return nil, err
	}
	// Free ports are picked by binding and closing, so another process can
	// take one before etcd or kube-apiserver binds it: retry with new ports
	// when that is why start-up failed.
	start := time.Now()
	for attempt := 1; ; attempt++ {
		err = s.startProcs(ctx, cfg, etcdPath, token)
		if err == nil {
			break
		}
		if attempt == 3 || !strings.Contains(err.Error(), "address already in use") {
			return nil, err
		}
		fmt.Fprintf(logw, "a loopback port was taken during start-up, retrying with new ports: %v\n", err)
		if serr := s.Stop(); serr != nil {
			return nil, errors.Join(err, serr)
		}
		if err := os.RemoveAll(filepath.Join(cfg.Dir, "etcd")); err != nil {
			return nil, fmt.Errorf("removing etcd data before retrying: %w", err)
		}
	}
	if s.Client, err = kubernetes.NewForConfig(s.REST); err != nil {
		return nil, fmt.Errorf("building the admin client: %w", err)
	}
	fmt.Fprintf(logw, "kube-apiserver ready at %s in %s\n", s.URL, time.Since(start).Round(time.Millisecond))
	return s, nil
}

// startProcs starts etcd and kube-apiserver on newly picked free ports and
// waits for the API server to be ready.
func (s *Server) startProcs(ctx context.Context, cfg Config, etcdPath, token string) error {
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, securePort := ports[0], ports[1], ports[2]
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClient)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeer)

	if err := s.spawn(cfg, "etcd", etcdPath,
		"--name", "nodemesh-lab",
		"--data-dir", filepath.Join(cfg.Dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "nodemesh-lab="+peerURL,
		"--log-level", "error",
	); err != nil {
		return err
	}
	bind, reconciler := "127.0.0.1", "none"
	if cfg.BindAddress != "" {
		bind, reconciler = cfg.BindAddress, "lease"
	}
	args := []string{
		"--etcd-servers", etcdURL,
		"--bind-address", bind,
		"--advertise-address", bind,
		"--secure-port", strconv.Itoa(securePort),
		"--cert-dir", filepath.Join(cfg.Dir, "certs"),
		"--tls-cert-file", s.path("serving.crt"),
		"--tls-private-key-file", s.path("serving.key"),
		"--client-ca-file", s.path("ca.crt"),
		"--token-auth-file", s.path("tokens.csv"),
		"--service-account-key-file", s.path("sa.pub"),
		"--service-account-signing-key-file", s.path("sa.key"),
		"--service-account-issuer", Issuer,
		"--service-cluster-ip-range", cfg.ServiceCIDR,
		"--authorization-mode", "Node,RBAC",
		"--enable-priority-and-fairness=false",
		"--endpoint-reconciler-type", reconciler,
		"--profiling=false",
		"--kubelet-client-certificate", s.path("kubelet-client.crt"),
		"--kubelet-client-key", s.path("kubelet-client.key"),
		"--kubelet-preferred-address-types", "InternalIP,Hostname",
		"--v", "0",
	}
	if cfg.KubeletEgress != "" {
		conf := s.path("egress-selector.yaml")
		// HTTP CONNECT over a Unix socket for the "cluster" network
		// (kubelets, pods); the control plane and etcd stay direct.
		y := "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n" +
			"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n      uds:\n        udsName: " + strconv.Quote(cfg.KubeletEgress) + "\n"
		if err := os.WriteFile(conf, []byte(y), 0o600); err != nil {
			return fmt.Errorf("writing the egress selector configuration: %w", err)
		}
		args = append(args, "--egress-selector-config-file", conf)
	}
	if err := s.spawn(cfg, "kube-apiserver", cfg.Binary, args...); err != nil {
		return err
	}
	s.URL = "https://" + net.JoinHostPort(bind, strconv.Itoa(securePort))
	s.REST = s.ClientFor(token)
	if err := s.writeKubeconfig(token); err != nil {
		return err
	}
	return s.waitReady(ctx, token)
}

// ClientFor returns a REST config that authenticates with a bearer token,
// for example a TokenRequest token of a service account.
func (s *Server) ClientFor(token string) *rest.Config {
	return &rest.Config{
		Host:            s.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: s.caPEM},
		QPS:             200,
		Burst:           400,
	}
}

// Stop ends kube-apiserver and etcd and waits for them.
func (s *Server) Stop() error {
	var errs []error
	for i := len(s.procs) - 1; i >= 0; i-- {
		c := s.procs[i]
		if c.Process == nil {
			continue
		}
		_ = c.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- c.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = c.Process.Kill()
			<-done
		}
	}
	s.procs = nil
	for _, name := range []string{"etcd", "kube-apiserver"} {
		if err := os.Remove(s.path(name + ".pid")); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Sweep kills etcd and kube-apiserver processes recorded in dir's pid files,
// left behind by a caller that was killed. It only kills a pid whose command
// line still names the recorded binary, so a recycled pid is left alone.
func Sweep(dir string) {
	for _, name := range []string{"kube-apiserver", "etcd"} {
		pidFile := filepath.Join(dir, name+".pid")
		b, err := os.ReadFile(pidFile)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err == nil && pid > 1 {
			if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && bytes.Contains(cmdline, []byte(name)) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				for i := 0; i < 100 && !pidGone(pid); i++ {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}
		_ = os.Remove(pidFile)
	}
}

func (s *Server) path(name string) string { return filepath.Join(s.Dir, name) }

func (s *Server) spawn(cfg Config, name, bin string, args ...string) (err error) {
	logf, err := os.OpenFile(s.path(name+".log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("opening %s log: %w", name, err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if cfg.Detach {
		// A session of its own: the lab CLI's terminal going away must not
		// take the API server with it.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		err = cmd.Start()
	} else {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		err = startFromParkedThread(cmd)
	}
	if err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	s.procs = append(s.procs, cmd)
	if err := os.WriteFile(s.path(name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600); err != nil {
		return fmt.Errorf("writing %s pid file: %w", name, err)
	}
	return nil
}

func (s *Server) waitReady(ctx context.Context, token string) error {
	client := &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pool(s.caPEM), MinVersion: tls.VersionTLS12,
		}},
	}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(90 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		for _, c := range s.procs {
			if c.ProcessState != nil || processGone(c) {
				return fmt.Errorf("%s exited during start-up; its log %s ends with:\n%s", filepath.Base(c.Path), s.path(filepath.Base(c.Path)+".log"), s.logTail(filepath.Base(c.Path)))
			}
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for kube-apiserver: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("kube-apiserver not ready after 90s (last: %s); log %s ends with:\n%s", last, s.path("kube-apiserver.log"), s.logTail("kube-apiserver"))
}

func processGone(c *exec.Cmd) bool { return pidGone(c.Process.Pid) }

// pidGone reports whether pid has exited: no longer in /proc, or a zombie
// waiting to be reaped (which signal 0 would still report as alive).
func pidGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) {
		return b[i+2] == 'Z'
	}
	return false
}

// Pdeathsig fires when the *thread* that forked the child exits, not the
// process, and the Go runtime ends threads whose goroutine exits while
// locked (which is how setns-based code returns a thread it cannot clean).
// Children that must die with us are therefore forked from one thread that
// is locked for the life of the process and never exits.
var (
	spawnOnce sync.Once
	spawnReqs chan spawnReq
)

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

func startFromParkedThread(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnReqs = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: this thread lives as long as the process
			for r := range spawnReqs {
				r.done <- r.cmd.Start()
			}
		}()
	})
	r := spawnReq{cmd: cmd, done: make(chan error, 1)}
	spawnReqs <- r
	return <-r.done
}

func (s *Server) logTail(name string) string {
	b, _ := os.ReadFile(s.path(name + ".log"))
	return string(tail(b, 3000))
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// writeCredentials creates the CA, the serving certificate, the
// service-account signing key and the admin token.
func (s *Server) writeCredentials(bindIP net.IP, extra []Token) (token string, err error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generating the lab CA key: %w", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "nodemesh-lab-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return "", fmt.Errorf("signing the lab CA: %w", err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generating the serving key: %w", err)
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.ParseIP("10.96.0.1"), bindIP},
		DNSNames:     []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return "", fmt.Errorf("signing the serving certificate: %w", err)
	}
	// The API server's client certificate towards kubelets (the lab's
	// kubelet stand-in requires it, signed by the lab CA).
	kcKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generating the kubelet client key: %w", err)
	}
	kcTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	kcDER, err := x509.CreateCertificate(rand.Reader, kcTmpl, caCert, &kcKey.PublicKey, caKey)
	if err != nil {
		return "", fmt.Errorf("signing the kubelet client certificate: %w", err)
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generating the service-account signing key: %w", err)
	}
	tok := make([]byte, 24)
	if _, err := rand.Read(tok); err != nil {
		return "", fmt.Errorf("generating the admin token: %w", err)
	}
	token = hex.EncodeToString(tok)

	s.caPEM = pemBlock("CERTIFICATE", caDER)
	s.CAFile = s.path("ca.crt")
	tokens := token + ",nodemesh-lab-admin,nodemesh-lab-admin,system:masters\n"
	for _, t := range extra {
		uid := t.UID
		if uid == "" {
			uid = t.User
		}
		tokens += t.Token + "," + t.User + "," + uid
		if len(t.Groups) > 0 {
			tokens += `,"` + strings.Join(t.Groups, ",") + `"`
		}
		tokens += "\n"
	}
	files := map[string][]byte{
		"ca.crt":             s.caPEM,
		"serving.crt":        append(pemBlock("CERTIFICATE", srvDER), s.caPEM...),
		"kubelet-client.crt": pemBlock("CERTIFICATE", kcDER),
		"tokens.csv":         []byte(tokens),
	}
	for name, key := range map[string]*ecdsa.PrivateKey{"serving.key": srvKey, "sa.key": saKey, "kubelet-client.key": kcKey} {
		der, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return "", fmt.Errorf("encoding %s: %w", name, err)
		}
		files[name] = pemBlock("EC PRIVATE KEY", der)
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return "", fmt.Errorf("encoding the service-account public key: %w", err)
	}
	files["sa.pub"] = pemBlock("PUBLIC KEY", pub)
	for name, b := range files {
		if err := os.WriteFile(s.path(name), b, 0o600); err != nil {
			return "", fmt.Errorf("writing %s: %w", name, err)
		}
	}
	return token, nil
}

func (s *Server) writeKubeconfig(token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["nodemesh-lab"] = &clientcmdapi.Cluster{Server: s.URL, CertificateAuthorityData: s.caPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["nodemesh-lab"] = &clientcmdapi.Context{Cluster: "nodemesh-lab", AuthInfo: "admin"}
	cfg.CurrentContext = "nodemesh-lab"
	s.Kubeconfig = s.path("kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, s.Kubeconfig); err != nil {
		return fmt.Errorf("writing the kubeconfig: %w", err)
	}
	return nil
}

// Load attaches to a server started (detached) by another process in dir.
func Load(dir string) (*Server, error) {
	kc := filepath.Join(dir, "kubeconfig")
	rc, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		return nil, fmt.Errorf("reading the lab kubeconfig %s (is the lab up?): %w", kc, err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("building the admin client: %w", err)
	}
	return &Server{
		Dir: dir, URL: rc.Host, Kubeconfig: kc, CAFile: filepath.Join(dir, "ca.crt"),
		REST: rc, Client: cs, ServiceCIDR: DefaultServiceCIDR, Issuer: Issuer, caPEM: rc.CAData,
	}, nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func pool(caPEM []byte) *x509.CertPool {
	p := x509.NewCertPool()
	p.AppendCertsFromPEM(caPEM)
	return p
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free loopback port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
