package workloads

import (
	"log/slog"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/agent/state"
)

// How a local pod's network namespace is found (--pod-netns).
const (
	// NetnsAuto: the lab's annotations where present, else /proc.
	NetnsAuto = "auto"
	// NetnsProc: the pod UID in /proc/<pid>/cgroup (real nodes); never
	// annotations, because anyone who can create a pod can write one.
	NetnsProc = "proc"
	// NetnsAnnotations: the annotations the lab writes, as kubelet would.
	NetnsAnnotations = "annotations"
)

// Scanner finds the network namespaces of the pods running on this node
// (nodeinfo.Scanner walks /proc for pod UIDs in cgroup paths).
type Scanner interface {
	Scan() (map[string]nodeinfo.Sandbox, map[string]error, error)
}

// Locator fills in where the enrolled pods of this node live. It caches
// the sandboxes found in /proc by pod UID, so /proc is walked only for new
// pods or a sandbox that is gone. It is used by one goroutine (the
// reconcile loop).
type Locator struct {
	mode    string
	scanner Scanner // nil: never scan
	log     *slog.Logger
	// alive checks a cached sandbox (stillThere; tests replace it).
	alive   func(nodeinfo.Sandbox) bool
	located map[string]nodeinfo.Sandbox
	// reported are the sandboxes the CNI plugin reported (nil: none);
	// they come first.
	reported *Reported
}

// UseReported makes the Locator take a pod's network namespace, and its
// addresses while the API has none yet, from r (the CNI plugin's reports)
// before any other source.
func (l *Locator) UseReported(r *Reported) { l.reported = r }

// NewLocator returns a Locator for mode (Netns*); scanner is not used with
// NetnsAnnotations and may be nil then.
func NewLocator(mode string, scanner Scanner, log *slog.Logger) *Locator {
	if mode == NetnsAnnotations {
		scanner = nil
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Locator{mode: mode, scanner: scanner, log: log, alive: stillThere, located: make(map[string]nodeinfo.Sandbox)}
}

// Locate returns pods with their network namespace and cgroup filled in
// (copies: snapshots are immutable). A pod not found keeps an empty Netns
// and is retried on the next call. /proc is scanned at most once per call,
// and only if some pod needs it. Sandboxes of pods no longer in pods are
// forgotten.
func (l *Locator) Locate(pods []*state.Pod) []*state.Pod {
	var (
		scanned bool
		found   map[string]nodeinfo.Sandbox
	)
	scan := func() map[string]nodeinfo.Sandbox {
		if scanned || l.scanner == nil {
			return found
		}
		scanned = true
		f, errs, err := l.scanner.Scan()
		if err != nil {
			l.log.Error("finding pods' network namespaces in /proc", "err", err)
			return nil
		}
		for uid, err := range errs {
			// Ambiguous pods are never captured by guesswork.
			l.log.Warn("pod network namespace not usable", "pod_uid", uid, "err", err)
		}
		found = f
		return found
	}
	out := make([]*state.Pod, 0, len(pods))
	seen := make(map[string]bool, len(pods))
	for _, p := range pods {
		seen[p.UID()] = true
		out = append(out, l.locate(p, scan))
	}
	for uid := range l.located {
		if !seen[uid] {
			delete(l.located, uid)
		}
	}
	l.reported.Keep(seen)
	return out
}

// locate fills in where one pod lives. The lab's annotations are used only
// with NetnsAnnotations or NetnsAuto. (A forged path still could not serve
// another pod: capture binds 15008 to the pod's own IP inside the
// namespace, which fails elsewhere.)
func (l *Locator) locate(p *state.Pod, scan func() map[string]nodeinfo.Sandbox) *state.Pod {
	if !p.Enrolled || !p.Live() {
		return p
	}
	// The runtime's own word, given before the pod's first process: the
	// namespace the CNI plugin passed, kept for the pod's life (a path
	// that changed would re-enroll it), and its addresses until the API
	// has them.
	if rep, ok := l.reported.Get(p.UID()); ok {
		cp := *p
		cp.SetLocation(rep.Netns, "")
		if len(cp.IPs) == 0 {
			cp.IPs = rep.IPs
		}
		return &cp
	}
	if len(p.IPs) == 0 {
		return p
	}
	if p.Netns() != "" && l.mode != NetnsProc {
		return p
	}
	cp := *p
	cp.SetLocation("", "")
	if p.UID() == "" {
		return &cp
	}
	sb, ok := l.located[p.UID()]
	if !ok || !l.alive(sb) {
		sb, ok = scan()[p.UID()]
	}
	if ok {
		l.located[p.UID()] = sb
		cp.SetLocation(sb.Netns, sb.Cgroup)
	}
	return &cp
}

// stillThere reports whether a sandbox found earlier still lives: its
// /proc/<pid>/ns/net link resolves to the same namespace (a recycled pid in
// another namespace has another inode).
func stillThere(sb nodeinfo.Sandbox) bool {
	var st unix.Stat_t
	return unix.Stat(sb.Netns, &st) == nil && st.Ino == sb.NetnsInode
}
