// Package lab builds a multi-node Kubernetes cluster on one Linux machine:
// every node is a network namespace on a shared underlay bridge, every pod
// a network namespace with a veth to its node and its own cgroup v2
// directory, and a real kube-apiserver (with etcd) on loopback holds the
// Nodes, Namespaces, ServiceAccounts, Pods, Services and EndpointSlices the
// lab writes as kubelet and the controllers would. Service ClusterIPs work
// for pods outside any mesh through nftables DNAT in each node, the way
// kube-proxy makes them work.
//
// Everything the lab creates is named with Prefix and the lab's ID and is
// removed by Down, also after the creating process was killed.
//
// Use it in-process:
//
//	l, err := lab.Up(ctx, sp, lab.Options{StateDir: dir})
//	defer l.Down(ctx)
//	out, err := l.Exec(ctx, "client/client-1", []string{"nodemeshctl", "lab", "workload", "get", "http://10.244.2.2:8080/"})
//
// or from another process with Load(stateDir).
package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/spec"
)

// ErrNotRoot means the caller lacks the privileges the lab needs.
var ErrNotRoot = errors.New("the lab needs root (network namespaces, cgroups, nftables): run it with sudo")

// Options configure Up. Every process of a lab is started detached (its
// own session), so a lab outlives the process that created it; Down, or
// the next Up with the same state directory, removes it.
type Options struct {
	// StateDir holds the lab's state, logs, the API server's files and the
	// kubeconfig. Default DefaultStateDir.
	StateDir string
	// ID names the lab's kernel objects (Prefix+ID+"-..."): 1-6 lower-case
	// letters or digits. Default IDFor(StateDir).
	ID string
	// SpecFile is recorded for `lab status`; optional.
	SpecFile string
	// APIServerBinary is the kube-apiserver to run; "" = apiserver.Binary.
	APIServerBinary string
	// WorkloadBinary runs pod commands whose argv[0] is "nodemeshctl"; ""
	// re-executes this process's own binary (see the package's init).
	WorkloadBinary string
	// ReadyTimeout bounds the wait for pods to listen on their declared
	// TCP ports. Default 60s.
	ReadyTimeout time.Duration
	// Log receives progress; nil discards it.
	Log *slog.Logger
}

// Lab is a running lab.
type Lab struct {
	// Server is the lab's API server (admin client and REST config).
	Server *apiserver.Server

	names        names
	underlay     netip.Prefix
	log          *slog.Logger
	workloadBin  string
	readyTimeout time.Duration

	mu sync.Mutex // guards st; held for the whole of Apply
	st *state

	cmu      sync.Mutex // guards children
	children map[int]chan struct{}
	wg       sync.WaitGroup // owns the goroutines reaping children
}

func newLab(st *state, log *slog.Logger) (*Lab, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	under, err := netip.ParsePrefix(st.Spec.Network.Underlay)
	if err != nil {
		return nil, fmt.Errorf("lab state: underlay: %w", err)
	}
	return &Lab{
		names: names{Prefix + st.ID}, underlay: under, log: log, st: st,
		children: map[int]chan struct{}{}, readyTimeout: 60 * time.Second,
	}, nil
}

// Up builds the lab described by sp. Leftovers of an earlier lab with the
// same state directory and ID are swept first. On error everything built
// so far is removed again.
func Up(ctx context.Context, sp *spec.Spec, opts Options) (_ *Lab, err error) {
	start := time.Now()
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	sp = cloneSpec(sp)
	sp.Default()
	if err := sp.Validate(opts.SpecFile); err != nil {
		return nil, err
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	dir, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if opts.ID == "" {
		opts.ID = IDFor(dir)
	}
	if !ValidID(opts.ID) {
		return nil, fmt.Errorf("lab ID %q: use 1-6 lower-case letters or digits", opts.ID)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var l *Lab
	defer func() {
		if err != nil {
			log.Info("lab up failed, removing what was built", "err", err)
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if serr := sweep(cctx, dir, opts.ID, log); serr != nil {
				err = errors.Join(err, fmt.Errorf("cleaning up after the failure: %w", serr))
			}
			_ = os.Remove(filepath.Clean(dir) + ".lock")
			if l != nil {
				if l.Server != nil {
					_ = l.Server.Stop() // reaps; the sweep killed it
				}
				l.wg.Wait()
			}
		}
	}()

	// Leftovers: whatever lab last used this directory, and this ID.
	if old := IDFor(dir); old != opts.ID {
		if err := sweep(ctx, dir, old, log); err != nil {
			return nil, fmt.Errorf("cleaning up the previous lab in %s: %w", dir, err)
		}
	}
	if err := sweep(ctx, dir, opts.ID, log); err != nil {
		return nil, fmt.Errorf("cleaning up leftovers of lab %s: %w", opts.ID, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "id"), []byte(opts.ID+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("writing the lab id: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "creator"), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("writing the lab creator: %w", err)
	}
	cg2, err := cgroup.Mount()
	if err != nil {
		return nil, err
	}
	st := &state{
		Version: stateVersion, ID: opts.ID, Dir: dir, Cgroup2: cg2,
		CgroupRoot: filepath.Join(cg2, Prefix+opts.ID), Creator: os.Getpid(),
		SpecFile: opts.SpecFile, Spec: &spec.Spec{Network: sp.Network, Nodes: sp.Nodes},
		Nodes: map[string]*Node{}, Pods: map[string]*Pod{}, Services: map[string]*Service{},
	}
	st.APIServer.ServiceCIDR = sp.Network.ServiceCIDR
	if l, err = newLab(st, log); err != nil {
		return nil, err
	}
	l.workloadBin = opts.WorkloadBinary
	if opts.ReadyTimeout > 0 {
		l.readyTimeout = opts.ReadyTimeout
	}
	if err := st.save(); err != nil {
		return nil, err
	}

	// The API server takes seconds to start; build the network meanwhile.
	type srvResult struct {
		s   *apiserver.Server
		err error
	}
	srvc := make(chan srvResult, 1)
	sctx, cancelSrv := context.WithCancel(ctx)
	defer cancelSrv()
	go func() {
		s, err := apiserver.Start(sctx, apiserver.Config{
			Dir: filepath.Join(dir, "apiserver"), Binary: opts.APIServerBinary,
			// Always detached: Pdeathsig fires when the *thread* that
			// forked exits, and netns.Do ends locked threads on purpose,
			// which would kill the API server at random. Down sweeps it.
			ServiceCIDR: sp.Network.ServiceCIDR, Detach: true,
			Log:           slogWriter{log},
			KubeletEgress: kubeletSocket(dir),
		})
		srvc <- srvResult{s, err}
	}()
	netErr := l.buildNodes(ctx, sp)
	if netErr != nil {
		cancelSrv()
	}
	res := <-srvc
	if res.err != nil {
		if res.s != nil {
			_ = res.s.Stop()
		}
		return nil, errors.Join(netErr, fmt.Errorf("starting the API server: %w", res.err))
	}
	l.Server = res.s
	if netErr != nil {
		return nil, netErr
	}
	st.APIServer.URL, st.APIServer.Kubeconfig = res.s.URL, res.s.Kubeconfig
	if res.s.ServiceCIDR != sp.Network.ServiceCIDR {
		return nil, fmt.Errorf("the API server allocates ClusterIPs from %s but the spec says network.serviceCIDR %s", res.s.ServiceCIDR, sp.Network.ServiceCIDR)
	}
	if err := l.adoptControlPlane(); err != nil {
		return nil, err
	}
	if err := l.startAPIProxy(ctx); err != nil {
		return nil, err
	}
	for _, n := range sortedNodes(st.Nodes) {
		sn, _ := sp.Node(n.Name)
		if err := l.createNode(ctx, n, sn); err != nil {
			return nil, err
		}
	}
	if err := l.reconcile(ctx, sp); err != nil {
		return nil, err
	}
	st.StartupSeconds = time.Since(start).Seconds()
	if err := st.save(); err != nil {
		return nil, err
	}
	log.Info("lab up", "id", st.ID, "nodes", len(st.Nodes), "pods", len(st.Pods), "services", len(st.Services), "took", time.Since(start).Round(time.Millisecond))
	return l, nil
}

// buildNodes creates the cgroup root, the bridge and every node.
func (l *Lab) buildNodes(ctx context.Context, sp *spec.Spec) error {
	st := l.st
	if err := cgroup.Create(st.CgroupRoot); err != nil {
		return err
	}
	if err := ensureBPFFS(); err != nil {
		l.log.Warn("no BPF filesystem; programs in the lab cannot pin objects", "err", err)
	} else if err := os.MkdirAll(l.names.bpfDir(), 0o700); err != nil {
		return fmt.Errorf("creating the BPF pin directory: %w", err)
	}
	if err := l.setupBridge(ctx); err != nil {
		return err
	}
	for i, sn := range sp.Nodes {
		gw, err := gatewayOf(sn.PodCIDR)
		if err != nil {
			return err
		}
		n := &Node{
			Name: sn.Name, Index: i, IP: sn.IP, PodCIDR: sn.PodCIDR, Gateway: gw,
			Netns:         netnsPath(l.names.nodeNetns(sn.Name)),
			Link:          l.names.nodeLink(i),
			Cgroup:        filepath.Join(st.CgroupRoot, "node-"+sn.Name),
			ProcessCgroup: filepath.Join(st.CgroupRoot, "system", sn.Name),
		}
		if sp.Network.IPv6 {
			ip6, err := embed6(node6Prefix, sn.IP)
			if err != nil {
				return fmt.Errorf("node %s: %w", sn.Name, err)
			}
			n.IP6 = ip6.String()
		}
		st.Nodes[n.Name] = n
	}
	for _, n := range sortedNodes(st.Nodes) {
		if err := cgroup.Create(n.Cgroup); err != nil {
			return err
		}
		if err := cgroup.Create(n.ProcessCgroup); err != nil {
			return err
		}
		if err := l.setupNode(ctx, n, st.Nodes); err != nil {
			return err
		}
	}
	return st.save()
}

// adoptControlPlane moves etcd and kube-apiserver into the lab's cgroup so
// that a cgroup kill ends them even if their pid files are lost.
func (l *Lab) adoptControlPlane() error {
	dir := filepath.Join(l.st.CgroupRoot, "control")
	if err := cgroup.Create(dir); err != nil {
		return err
	}
	for _, name := range []string{"etcd", "kube-apiserver"} {
		b, err := os.ReadFile(filepath.Join(l.Server.Dir, name+".pid"))
		if err != nil {
			return fmt.Errorf("reading the %s pid file: %w", name, err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return fmt.Errorf("parsing the %s pid file: %w", name, err)
		}
		if err := cgroup.Move(dir, pid); err != nil {
			return err
		}
	}
	return nil
}

// Load attaches to a lab that another process brought up in stateDir.
func Load(stateDir string) (*Lab, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	dir, err := filepath.Abs(stateDir)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	st, err := loadState(dir)
	if err != nil {
		return nil, err
	}
	l, err := newLab(st, nil)
	if err != nil {
		return nil, err
	}
	srv, err := apiserver.Load(filepath.Join(dir, "apiserver"))
	if err != nil {
		return nil, err
	}
	srv.ServiceCIDR = st.APIServer.ServiceCIDR
	l.Server = srv
	return l, nil
}

// SetLogger sets where a loaded lab logs.
func (l *Lab) SetLogger(log *slog.Logger) {
	if log != nil {
		l.log = log
	}
}

// Apply changes the running lab to match sp: pods, services and namespaces
// are added, removed or updated (EndpointSlices and service rules follow);
// pods whose node, command, service account or ports changed are
// restarted. Nodes and the network plan cannot change without down + up.
func (l *Lab) Apply(ctx context.Context, sp *spec.Spec) error {
	sp = cloneSpec(sp)
	sp.Default()
	if err := sp.Validate(""); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	unlock, err := lockDir(l.st.Dir)
	if err != nil {
		return err
	}
	defer unlock()
	// Another process may have applied since this one loaded the state.
	if fresh, err := loadState(l.st.Dir); err == nil && fresh.ID == l.st.ID {
		l.st = fresh
	}
	if !reflect.DeepEqual(sp.Network, l.st.Spec.Network) {
		return fmt.Errorf("network: changed from %+v to %+v; the address plan cannot change on a running lab: run `nodemeshctl lab down` and up again", l.st.Spec.Network, sp.Network)
	}
	if !reflect.DeepEqual(sp.Nodes, l.st.Spec.Nodes) {
		return errors.New("nodes: changed; nodes cannot change on a running lab: run `nodemeshctl lab down` and up again")
	}
	return l.reconcile(ctx, sp)
}

// runtimeEqual reports whether two specs of one pod can share a process.
func runtimeEqual(a, b *spec.Pod) bool {
	return a.Node == b.Node && a.ServiceAccount == b.ServiceAccount &&
		reflect.DeepEqual(a.Command, b.Command) && reflect.DeepEqual(a.Ports, b.Ports)
}

// reconcile moves the lab from l.st.Spec to sp (with the same nodes).
func (l *Lab) reconcile(ctx context.Context, sp *spec.Spec) error {
	old := l.st.Spec
	for _, ns := range sp.Namespaces {
		if err := l.ensureNamespace(ctx, ns.Name, ns.Labels); err != nil {
			return err
		}
	}
	// Pods that go away (or must restart) go first, so their addresses and
	// names are free.
	var added, relabeled []*spec.Pod
	for i := range old.Pods {
		op := &old.Pods[i]
		np, ok := sp.Pod(op.Key())
		if ok && runtimeEqual(op, np) {
			continue
		}
		if p, ok := l.st.Pods[op.Key()]; ok {
			if err := l.stopPod(ctx, p); err != nil {
				return err
			}
		}
	}
	for i := range sp.Pods {
		np := &sp.Pods[i]
		op, ok := old.Pod(np.Key())
		_, running := l.st.Pods[np.Key()]
		switch {
		case !ok || !running || !runtimeEqual(op, np):
			added = append(added, np)
		case !mapsEqual(op.Labels, np.Labels) || !mapsEqual(op.Annotations, np.Annotations):
			relabeled = append(relabeled, np)
		}
	}
	l.st.Spec = &spec.Spec{APIVersion: sp.APIVersion, Kind: sp.Kind, Network: sp.Network, Nodes: sp.Nodes,
		Namespaces: sp.Namespaces, Pods: old.Pods, Services: old.Services}
	// Keep the recorded spec true to what runs while pods start: drop the
	// stopped ones now, add the new ones as they come up.
	var keep []spec.Pod
	for _, op := range old.Pods {
		if _, ok := l.st.Pods[op.Key()]; ok {
			keep = append(keep, op)
		}
	}
	l.st.Spec.Pods = keep
	for _, np := range added {
		if err := l.ensureServiceAccount(ctx, np.Namespace, np.ServiceAccount); err != nil {
			return err
		}
	}
	if err := l.startPods(ctx, added); err != nil {
		return err
	}
	for _, np := range relabeled {
		p := l.st.Pods[np.Key()]
		p.Labels = np.Labels
		if err := l.updatePodMeta(ctx, p, np); err != nil {
			return err
		}
	}
	l.st.Spec.Pods = sp.Pods
	if err := l.st.save(); err != nil {
		return err
	}

	// Services, their EndpointSlices and the nodes' service rules.
	for _, os := range old.Services {
		if _, ok := findService(sp, os.Key()); !ok {
			if err := l.deleteService(ctx, os.Namespace, os.Name); err != nil {
				return err
			}
			delete(l.st.Services, os.Key())
		}
	}
	l.st.Spec.Services = sp.Services
	for i := range sp.Services {
		ss := &sp.Services[i]
		ip, err := l.ensureService(ctx, ss)
		if err != nil {
			return err
		}
		l.st.Services[ss.Key()] = &Service{Namespace: ss.Namespace, Name: ss.Name, ClusterIP: ip, Ports: ss.Ports}
		if err := l.syncSlices(ctx, ss, l.endpointsOf(ss)); err != nil {
			return err
		}
	}
	if err := l.programServices(ctx); err != nil {
		return err
	}
	for _, ons := range old.Namespaces {
		if _, ok := sp.Namespace(ons.Name); ok || systemNamespaces[ons.Name] {
			continue
		}
		if err := l.deleteNamespace(ctx, ons.Name); err != nil {
			return err
		}
	}
	l.st.Spec = sp
	return l.st.save()
}

// systemNamespaces exist in every cluster; dropping one from the spec
// leaves it alone.
var systemNamespaces = map[string]bool{"default": true, "kube-system": true, "kube-public": true, "kube-node-lease": true}

func findService(sp *spec.Spec, key string) (*spec.Service, bool) {
	for i := range sp.Services {
		if sp.Services[i].Key() == key {
			return &sp.Services[i], true
		}
	}
	return nil, false
}

// startPods starts the pods, waits until they are ready and publishes
// them. If any fails, the ones started here are removed again and the
// state saved, so that the lab stays as it was and a corrected spec can be
// applied.
func (l *Lab) startPods(ctx context.Context, sps []*spec.Pod) (err error) {
	started := make([]*Pod, 0, len(sps))
	defer func() {
		if err == nil {
			return
		}
		cctx := context.WithoutCancel(ctx)
		for _, p := range started {
			if serr := l.stopPod(cctx, p); serr != nil {
				err = errors.Join(err, fmt.Errorf("removing pod %s again: %w", p.Key(), serr))
			}
		}
		if serr := l.st.save(); serr != nil {
			err = errors.Join(err, serr)
		}
	}()
	for _, np := range sps {
		p, err := l.startPod(ctx, np)
		if err != nil {
			return err
		}
		started = append(started, p)
	}
	if err := l.waitReady(ctx, sps, started); err != nil {
		return err
	}
	now := time.Now()
	for i, np := range sps {
		if err := l.createPod(ctx, started[i], np, l.st.Nodes[np.Node], now); err != nil {
			return err
		}
	}
	return nil
}

// startPod builds a pod's namespace and cgroup and starts its command.
func (l *Lab) startPod(ctx context.Context, sp *spec.Pod) (_ *Pod, err error) {
	n, ok := l.st.Nodes[sp.Node]
	if !ok {
		return nil, fmt.Errorf("pod %s: node %q is not in the lab", sp.Key(), sp.Node)
	}
	idx, ip, err := l.allocPod(n)
	if err != nil {
		return nil, err
	}
	p := &Pod{
		Namespace: sp.Namespace, Name: sp.Name, Node: n.Name, Index: idx, IP: ip,
		Netns:          netnsPath(l.names.podNetns(sp.Namespace, sp.Name)),
		Cgroup:         filepath.Join(n.Cgroup, sp.Namespace+"_"+sp.Name),
		Link:           podLink(idx),
		ServiceAccount: sp.ServiceAccount,
		Labels:         sp.Labels,
		Log:            filepath.Join(l.st.Dir, "logs", "pod-"+sp.Namespace+"_"+sp.Name+".log"),
	}
	if l.ipv6() {
		ip6, err := embed6(pod6Prefix, ip)
		if err != nil {
			return nil, fmt.Errorf("pod %s: %w", sp.Key(), err)
		}
		p.IP6 = ip6.String()
	}
	l.st.Pods[p.Key()] = p
	defer func() {
		if err != nil {
			_ = l.stopPod(context.WithoutCancel(ctx), p)
		}
	}()
	if err := cgroup.Create(p.Cgroup); err != nil {
		return nil, err
	}
	if err := l.setupPodNet(ctx, p, n); err != nil {
		return nil, err
	}
	cmd, err := l.command(context.Background(), sp.Command)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", p.Key(), err)
	}
	cmd.Env = append(cmd.Env, l.podEnv(p)...)
	logf, err := openLog(p.Log)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := spawn(cmd, p.Netns, p.Cgroup, true); err != nil {
		return nil, fmt.Errorf("pod %s: %w", p.Key(), err)
	}
	p.Pid = cmd.Process.Pid
	l.track(cmd)
	l.log.Debug("pod started", "pod", p.Key(), "node", n.Name, "ip", p.IP, "pid", p.Pid)
	return p, nil
}

// waitReady waits until every started pod listens on its TCP ports (the
// readiness kubelet would report), failing fast when a command exits.
func (l *Lab) waitReady(ctx context.Context, sps []*spec.Pod, pods []*Pod) error {
	deadline := time.Now().Add(l.readyTimeout)
	for i, p := range pods {
		for _, cp := range sps[i].Ports {
			if cp.Protocol != "TCP" {
				continue
			}
			for delay := time.Millisecond; ; delay = min(delay*2, 50*time.Millisecond) {
				if l.exited(p.Pid) {
					return fmt.Errorf("pod %s: its command exited; log %s:\n%s", p.Key(), p.Log, logTail(p.Log, 2000))
				}
				ok, err := listening(p.Pid, cp.ContainerPort)
				if err == nil && ok {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("pod %s does not listen on TCP port %d after %s; see its log %s", p.Key(), cp.ContainerPort, l.readyTimeout, p.Log)
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("waiting for pod %s: %w", p.Key(), ctx.Err())
				case <-time.After(delay):
				}
			}
		}
	}
	return nil
}

// stopPod kills a pod's processes and removes its cgroup, namespace and
// Pod object.
func (l *Lab) stopPod(ctx context.Context, p *Pod) error {
	var errs []error
	if err := cgroup.Remove(ctx, p.Cgroup); err != nil {
		errs = append(errs, err)
	}
	if err := teardownPodNet(ctx, p); err != nil {
		errs = append(errs, err)
	}
	if l.Server != nil && p.UID != "" {
		if err := l.deletePod(ctx, p); err != nil {
			errs = append(errs, err)
		}
	}
	delete(l.st.Pods, p.Key())
	return errors.Join(errs...)
}

// Down removes the lab with the same sweep as the package-level Down, then
// reaps the processes this process started.
func (l *Lab) Down(ctx context.Context) error {
	err := Down(ctx, l.st.Dir)
	if l.Server != nil {
		// Everything is killed already; Stop only reaps etcd and
		// kube-apiserver if this process started them.
		_ = l.Server.Stop()
	}
	l.wg.Wait()
	return err
}

// Down removes the lab recorded in stateDir (or, without state, the lab
// whose ID IDFor derives): every process, cgroup, network namespace, link,
// nftables table, BPF pin and file it made. It works after the creator was
// killed with SIGKILL and with no state file at all, by sweeping names with
// the lab's prefix.
func Down(ctx context.Context, stateDir string) error {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	dir, err := filepath.Abs(stateDir)
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return err
	}
	err = sweep(ctx, dir, IDFor(dir), slog.New(slog.NewTextHandler(io.Discard, nil)))
	_ = os.Remove(filepath.Clean(dir) + ".lock")
	unlock()
	return err
}

// ID returns the lab's ID.
func (l *Lab) ID() string { return l.st.ID }

// StateDir returns the lab's state directory.
func (l *Lab) StateDir() string { return l.st.Dir }

// Kubeconfig returns the path of the admin kubeconfig. It works in the
// root namespace and, through the lab's API proxy, inside every node's
// namespace (same address, same port).
func (l *Lab) Kubeconfig() string { return l.Server.Kubeconfig }

// BPFDir returns the directory (on bpffs) where programs run in the lab
// should pin their objects; Down removes it.
func (l *Lab) BPFDir() string { return l.names.bpfDir() }

// CgroupRoot returns the lab's root cgroup directory.
func (l *Lab) CgroupRoot() string { return l.st.CgroupRoot }

// StartupTime returns how long Up took.
func (l *Lab) StartupTime() time.Duration {
	return time.Duration(l.st.StartupSeconds * float64(time.Second))
}

// Spec returns a copy of the spec the lab currently runs.
func (l *Lab) Spec() *spec.Spec {
	l.mu.Lock()
	defer l.mu.Unlock()
	return cloneSpec(l.st.Spec)
}

// Node returns a node by name.
func (l *Lab) Node(name string) (Node, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, ok := l.st.Nodes[name]
	if !ok {
		return Node{}, fmt.Errorf("no node %q in the lab (nodes: %s)", name, strings.Join(nodeNames(l.st.Nodes), ", "))
	}
	return *n, nil
}

// Nodes returns every node, by name.
func (l *Lab) Nodes() []Node {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Node
	for _, n := range sortedNodes(l.st.Nodes) {
		out = append(out, *n)
	}
	return out
}

// Pod returns a pod by "namespace/name", or by bare name when that is
// unique in the lab.
func (l *Lab) Pod(name string) (Pod, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if p, ok := l.st.Pods[name]; ok {
		return clonePod(p), nil
	}
	var found []*Pod
	if !strings.Contains(name, "/") {
		for _, p := range l.st.Pods {
			if p.Name == name {
				found = append(found, p)
			}
		}
	}
	switch len(found) {
	case 1:
		return clonePod(found[0]), nil
	case 0:
		return Pod{}, fmt.Errorf("no pod %q in the lab; name it as namespace/name (see `nodemeshctl lab status`)", name)
	}
	return Pod{}, fmt.Errorf("pod name %q is ambiguous; name it as namespace/name", name)
}

// Pods returns every pod, sorted by namespace/name.
func (l *Lab) Pods() []Pod {
	l.mu.Lock()
	defer l.mu.Unlock()
	keys := make([]string, 0, len(l.st.Pods))
	for k := range l.st.Pods {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]Pod, 0, len(keys))
	for _, k := range keys {
		out = append(out, clonePod(l.st.Pods[k]))
	}
	return out
}

// Service returns a service by "namespace/name".
func (l *Lab) Service(key string) (Service, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s, ok := l.st.Services[key]
	if !ok {
		return Service{}, fmt.Errorf("no service %q in the lab; name it as namespace/name", key)
	}
	return *s, nil
}

// Services returns every service, sorted by namespace/name.
func (l *Lab) Services() []Service {
	l.mu.Lock()
	defer l.mu.Unlock()
	keys := make([]string, 0, len(l.st.Services))
	for k := range l.st.Services {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]Service, 0, len(keys))
	for _, k := range keys {
		out = append(out, *l.st.Services[k])
	}
	return out
}

// Processes returns the processes started with StartNodeProcess.
func (l *Lab) Processes() []Process {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]Process, 0, len(l.st.Processes))
	for _, p := range l.st.Processes {
		out = append(out, *p)
	}
	return out
}

func clonePod(p *Pod) Pod {
	c := *p
	if p.Labels != nil {
		c.Labels = make(map[string]string, len(p.Labels))
		for k, v := range p.Labels {
			c.Labels[k] = v
		}
	}
	return c
}

func sortedNodes(m map[string]*Node) []*Node {
	out := make([]*Node, 0, len(m))
	for _, n := range m {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}

func nodeNames(m map[string]*Node) []string {
	var out []string
	for _, n := range sortedNodes(m) {
		out = append(out, n.Name)
	}
	return out
}

func netnsPath(name string) string { return filepath.Join("/run/netns", name) }

// slogWriter turns the API server's progress lines into log records.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(b []byte) (int, error) {
	w.log.Info(strings.TrimSpace(string(b)))
	return len(b), nil
}

// ensureBPFFS mounts the BPF filesystem at /sys/fs/bpf unless it is there
// already (it is shared with the host and stays mounted).
func ensureBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(bpfFS, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpf", bpfFS, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mounting bpffs at %s: %w", bpfFS, err)
	}
	return nil
}
