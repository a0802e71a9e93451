package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/nodemesh/nodemesh/lab/spec"
)

// Prefix starts the name of every kernel object and cgroup any lab makes;
// `nodemeshctl lab down --all` sweeps everything that carries it.
const Prefix = "nm-"

// DefaultStateDir is where `nodemeshctl lab` keeps its state by default.
const DefaultStateDir = "/run/nodemesh-lab"

// DefaultID is the lab ID used with DefaultStateDir.
const DefaultID = "lab"

// StateDirEnv overrides DefaultStateDir for nodemeshctl.
const StateDirEnv = "NODEMESH_LAB_DIR"

var idRE = regexp.MustCompile(`^[a-z0-9]{1,6}$`)

// ValidID reports whether id can name a lab: 1-6 lower-case letters or
// digits, so that every interface name stays within 15 characters.
func ValidID(id string) bool { return idRE.MatchString(id) }

// IDFor returns the lab ID for a state directory: the id file written by Up
// when there is one, else the suffix of a "nodemesh-<id>" directory name,
// else DefaultID.
func IDFor(stateDir string) string {
	if b, err := os.ReadFile(filepath.Join(stateDir, "id")); err == nil {
		if id := strings.TrimSpace(string(b)); ValidID(id) {
			return id
		}
	}
	base := filepath.Base(filepath.Clean(stateDir))
	if id, ok := strings.CutPrefix(base, "nodemesh-"); ok && ValidID(id) {
		return id
	}
	return DefaultID
}

// names derives every kernel object name of one lab from its prefix
// (Prefix + ID; this package's tests use their own).
type names struct{ p string }

func (n names) prefix() string { return n.p }
func (n names) bridge() string { return n.prefix() + "-br" }
func (n names) nodeNetns(node string) string {
	return n.prefix() + "-node-" + node
}
func (n names) podNetns(ns, pod string) string {
	return n.prefix() + "-pod-" + ns + "_" + pod
}
func (n names) nodeLink(idx int) string { return n.prefix() + "-n" + strconv.Itoa(idx) }

// podLink names a pod's veth end inside its node's namespace.
func podLink(idx int) string { return Prefix + "p" + strconv.Itoa(idx) }

func (n names) nftTable() string { return n.prefix() + "-svc" }
func (n names) bpfDir() string   { return filepath.Join(bpfFS, n.prefix()) }

const bpfFS = "/sys/fs/bpf"

// Node is a lab node as built.
type Node struct {
	Name    string `json:"name"`
	Index   int    `json:"index"`
	IP      string `json:"ip"`            // address on the underlay
	IP6     string `json:"ip6,omitempty"` // IPv6 address on the underlay (network.ipv6)
	PodCIDR string `json:"podCIDR"`       // the node's pod range
	Gateway string `json:"gateway"`       // pods' default gateway (first address of PodCIDR)
	Netns   string `json:"netns"`         // /run/netns/... path
	Link    string `json:"link"`          // the veth end on the underlay bridge (root namespace)
	// Cgroup is the per-node parent cgroup of the node's pods (absolute
	// path); a BPF program attached here sees every pod of the node.
	Cgroup string `json:"cgroup"`
	// ProcessCgroup is the parent of processes started with
	// StartNodeProcess; it is not under Cgroup, so pod programs do not see
	// the agent.
	ProcessCgroup string `json:"processCgroup"`
}

// Pod is a lab pod as built.
type Pod struct {
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	Node           string            `json:"node"`
	Index          int               `json:"index"` // per node; names the node-side veth
	IP             string            `json:"ip"`
	IP6            string            `json:"ip6,omitempty"` // global IPv6 address (network.ipv6)
	Netns          string            `json:"netns"`         // /run/netns/... path
	Cgroup         string            `json:"cgroup"`        // absolute cgroup directory
	Link           string            `json:"link"`          // veth end in the node's namespace
	ServiceAccount string            `json:"serviceAccount"`
	Labels         map[string]string `json:"labels,omitempty"`
	UID            string            `json:"uid"` // the Pod object's UID
	Pid            int               `json:"pid"` // the pod command's pid
	Log            string            `json:"log"` // its stdout and stderr
}

// Key returns "namespace/name".
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// Service is a lab service as published.
type Service struct {
	Namespace string             `json:"namespace"`
	Name      string             `json:"name"`
	ClusterIP string             `json:"clusterIP"`
	Ports     []spec.ServicePort `json:"ports"`
}

// Key returns "namespace/name".
func (s *Service) Key() string { return s.Namespace + "/" + s.Name }

// Process is a process started with StartNodeProcess.
type Process struct {
	Node   string   `json:"node"`
	Name   string   `json:"name"`
	Pid    int      `json:"pid"`
	Argv   []string `json:"argv"`
	Cgroup string   `json:"cgroup"`
	Log    string   `json:"log"`
}

// state is what state.json holds: enough for another process to Load the
// lab and for Down to find what to remove.
type state struct {
	Version    int                 `json:"version"`
	ID         string              `json:"id"`
	Dir        string              `json:"dir"`
	Cgroup2    string              `json:"cgroup2"` // cgroup v2 mount point
	CgroupRoot string              `json:"cgroupRoot"`
	Creator    int                 `json:"creator"`
	SpecFile   string              `json:"specFile,omitempty"`
	Spec       *spec.Spec          `json:"spec"`
	Nodes      map[string]*Node    `json:"nodes"`
	Pods       map[string]*Pod     `json:"pods"`
	Services   map[string]*Service `json:"services"`
	Processes  []*Process          `json:"processes,omitempty"`
	APIServer  struct {
		URL         string `json:"url"`
		Kubeconfig  string `json:"kubeconfig"`
		ServiceCIDR string `json:"serviceCIDR"`
		ProxyPid    int    `json:"proxyPid"`
	} `json:"apiServer"`
	StartupSeconds float64 `json:"startupSeconds"`
}

const stateVersion = 1

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

func (s *state) save() error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding lab state: %w", err)
	}
	tmp := statePath(s.Dir) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("writing lab state: %w", err)
	}
	if err := os.Rename(tmp, statePath(s.Dir)); err != nil {
		return fmt.Errorf("writing lab state: %w", err)
	}
	return nil
}

// ErrNoLab means the state directory holds no running lab.
var ErrNoLab = errors.New("no lab is up")

func loadState(dir string) (*state, error) {
	b, err := os.ReadFile(statePath(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("reading %s: %w (run `nodemeshctl lab up`)", statePath(dir), ErrNoLab)
	}
	if err != nil {
		return nil, fmt.Errorf("reading lab state: %w", err)
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", statePath(dir), err)
	}
	if s.Version != stateVersion {
		return nil, fmt.Errorf("%s has state version %d, this build reads %d: run `nodemeshctl lab down` and up again", statePath(dir), s.Version, stateVersion)
	}
	return &s, nil
}

// lockDir takes an exclusive lock on the state directory so that two
// processes never change one lab at once. The returned func unlocks.
func lockDir(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory %s: %w", dir, err)
	}
	// The lock file lives beside the state directory, so removing the
	// directory in Down does not drop the lock early.
	f, err := os.OpenFile(filepath.Clean(dir)+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening the lab lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking the lab state: %w", err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}
