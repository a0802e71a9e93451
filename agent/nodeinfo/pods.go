package nodeinfo

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// PodCgroup is what a /proc/<pid>/cgroup file says about a pod process.
type PodCgroup struct {
	// UID is the pod UID, in the API's form (dashes).
	UID string
	// Path is the cgroup path of the process, as the file shows it.
	Path string
	// PodPath is the prefix of Path ending at the pod's own cgroup.
	PodPath string
	// V2 is true when Path came from the cgroup v2 line ("0::...").
	V2 bool
}

// ParsePodCgroup finds the pod a process belongs to from the contents of
// its /proc/<pid>/cgroup. It understands kubelet's cgroupfs driver
// (.../kubepods/<qos>/pod<uid>/<container>) and systemd driver
// (.../kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope),
// on cgroup v2, v1 and hybrid nodes. The cgroup v2 line wins; on a v1-only
// node any controller line naming a pod is used. ok is false for a process
// that is not in a pod (system daemons, the kubelet, the runtime).
func ParsePodCgroup(content string) (pc PodCgroup, ok bool) {
	var v1 *PodCgroup
	for _, line := range strings.Split(content, "\n") {
		// hierarchy-ID:controller-list:cgroup-path; the path may contain ':'.
		id, rest, ok1 := strings.Cut(line, ":")
		_, p, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 {
			continue
		}
		uid, podPath, found := podFromPath(p)
		if !found {
			continue
		}
		c := PodCgroup{UID: uid, Path: p, PodPath: podPath}
		if id == "0" && strings.HasPrefix(rest, ":") {
			c.V2 = true
			return c, true
		}
		if v1 == nil {
			v1 = &c
		}
	}
	if v1 != nil {
		return *v1, true
	}
	return PodCgroup{}, false
}

// podFromPath extracts the pod UID from a cgroup path. The pod segment must
// sit below a kubepods segment, so an unrelated cgroup named "pod..." is
// never mistaken for a pod.
func podFromPath(p string) (uid, podPath string, ok bool) {
	segs := strings.Split(p, "/")
	kubepods := false
	for i, s := range segs {
		if !kubepods {
			// Guaranteed pods sit right below it: kubepods/pod<uid> or
			// kubepods.slice/kubepods-pod<uid_>.slice.
			kubepods = strings.Contains(s, "kubepods")
			continue
		}
		var cand string
		switch {
		case strings.HasSuffix(s, ".slice"):
			// systemd driver: kubepods-burstable-pod<uid_>.slice
			_, after, found := cutLast(strings.TrimSuffix(s, ".slice"), "-pod")
			if !found {
				continue
			}
			cand = strings.ReplaceAll(after, "_", "-")
		case strings.HasPrefix(s, "pod"):
			// cgroupfs driver: pod<uid>
			cand = strings.TrimPrefix(s, "pod")
		default:
			continue
		}
		if isUID(cand) {
			return strings.ToLower(cand), strings.Join(segs[:i+1], "/"), true
		}
	}
	return "", "", false
}

func cutLast(s, sep string) (before, after string, found bool) {
	if i := strings.LastIndex(s, sep); i >= 0 {
		return s[:i], s[i+len(sep):], true
	}
	return s, "", false
}

// isUID reports whether s is a UUID in its 8-4-4-4-12 hex form, as
// Kubernetes pod UIDs are.
func isUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// Sentinel errors of pod discovery.
var (
	// ErrPodNotFound: no process of the pod runs on this node (not started
	// yet, already gone, or scheduled elsewhere).
	ErrPodNotFound = errors.New("no process of the pod runs on this node")
	// ErrHostNetwork: every process of the pod shares the node's network
	// namespace (hostNetwork: true); such a pod cannot be captured.
	ErrHostNetwork = errors.New("the pod uses the node's network namespace (hostNetwork)")
	// ErrAmbiguousNetns: processes of one pod sit in different pod network
	// namespaces; refusing to guess.
	ErrAmbiguousNetns = errors.New("the pod's processes are in different network namespaces")
)

// Sandbox is a pod's network namespace on this node.
type Sandbox struct {
	UID string
	// PID is a process of the pod inside the namespace (the lowest such
	// pid, usually the sandbox's pause process).
	PID int
	// Netns is /proc/<pid>/ns/net under the scanner's proc root; it is
	// valid while PID lives. Open it (OpenNetns) to hold the namespace.
	Netns string
	// NetnsInode identifies the namespace (the inode of its nsfs link).
	NetnsInode uint64
	// Cgroup is the pod's cgroup v2 directory under the hierarchy mount,
	// empty on a node without cgroup v2 lines (v1 only).
	Cgroup string
}

// Scanner finds pod network namespaces by walking /proc. It needs the
// host's PID namespace (hostPID) to see the pods' processes, and read
// access to their /proc/<pid>/ns links (root with CAP_SYS_PTRACE for
// processes of other users, such as the pause container's 65535).
type Scanner struct {
	// Proc is the proc mount, "/proc" when empty.
	Proc string
	// Hierarchy maps cgroup paths to directories; zero leaves
	// Sandbox.Cgroup empty.
	Hierarchy Hierarchy
	// HostNetns is the inode of the node's network namespace, whose
	// processes are never a pod sandbox (CRI-O's conmon sits in the pod's
	// cgroup but in the node's netns). Zero means this process's own
	// network namespace, which is the node's for a hostNetwork agent.
	HostNetns uint64
	// NodeView reads /proc/<pid>/cgroup from the node's cgroup namespace
	// (HostView), as the Hierarchy from DiscoverNodeHierarchy expects. Set
	// it on real nodes, where the agent container has its own cgroup
	// namespace; it needs hostPID and CAP_SYS_ADMIN.
	NodeView bool
	// NodeCgroupNS is the node's cgroup namespace for NodeView;
	// NodeCgroupNS (the package constant) when empty.
	NodeCgroupNS string
}

func (s *Scanner) proc() string {
	if s.Proc == "" {
		return "/proc"
	}
	return s.Proc
}

type procInfo struct {
	pid   int
	pc    PodCgroup
	netns uint64
	err   error
}

// Scan returns the sandbox of every pod with a process on this node, by pod
// UID. Pods whose processes are all in the node's netns are left out; a
// pod whose processes disagree on their netns is reported in errs.
func (s *Scanner) Scan() (map[string]Sandbox, map[string]error, error) {
	procs, err := s.walk("")
	if err != nil {
		return nil, nil, err
	}
	byUID := map[string][]procInfo{}
	for _, p := range procs {
		byUID[p.pc.UID] = append(byUID[p.pc.UID], p)
	}
	out := map[string]Sandbox{}
	errs := map[string]error{}
	for uid, ps := range byUID {
		sb, err := s.sandbox(uid, ps)
		switch {
		case errors.Is(err, ErrHostNetwork):
		case err != nil:
			errs[uid] = err
		default:
			out[uid] = sb
		}
	}
	return out, errs, nil
}

// Find returns the sandbox of pod uid: ErrPodNotFound, ErrHostNetwork or
// ErrAmbiguousNetns (wrapped) when there is none to use.
func (s *Scanner) Find(uid string) (Sandbox, error) {
	uid = strings.ToLower(uid)
	if !isUID(uid) {
		return Sandbox{}, fmt.Errorf("finding pod %q: not a pod UID", uid)
	}
	procs, err := s.walk(uid)
	if err != nil {
		return Sandbox{}, err
	}
	return s.sandbox(uid, procs)
}

func (s *Scanner) hostNetns() (uint64, error) {
	if s.HostNetns != 0 {
		return s.HostNetns, nil
	}
	return nsInode(filepath.Join(s.proc(), "self", "ns", "net"))
}

// walk reads /proc/*/cgroup and returns the pod processes (of pod uid
// only, unless uid is empty) with their netns inode.
func (s *Scanner) walk(uid string) (procs []procInfo, err error) {
	if s.NodeView {
		err = HostView(s.NodeCgroupNS, func() error {
			procs, err = s.walkHere(uid)
			return err
		})
		return procs, err
	}
	return s.walkHere(uid)
}

func (s *Scanner) walkHere(uid string) ([]procInfo, error) {
	ents, err := os.ReadDir(s.proc())
	if err != nil {
		return nil, fmt.Errorf("scanning processes: %w", err)
	}
	var out []procInfo
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.proc(), e.Name(), "cgroup"))
		if err != nil {
			continue // exited meanwhile
		}
		pc, ok := ParsePodCgroup(string(b))
		if !ok || (uid != "" && pc.UID != uid) {
			continue
		}
		ino, err := nsInode(filepath.Join(s.proc(), e.Name(), "ns", "net"))
		if errors.Is(err, os.ErrNotExist) {
			continue // exited meanwhile
		}
		out = append(out, procInfo{pid: pid, pc: pc, netns: ino, err: err})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out, nil
}

func (s *Scanner) sandbox(uid string, procs []procInfo) (Sandbox, error) {
	if len(procs) == 0 {
		return Sandbox{}, fmt.Errorf("finding pod %s: %w", uid, ErrPodNotFound)
	}
	host, err := s.hostNetns()
	if err != nil {
		return Sandbox{}, fmt.Errorf("finding pod %s: reading the node's network namespace: %w", uid, err)
	}
	var chosen *procInfo
	var permErr error
	for i := range procs {
		p := &procs[i]
		if p.err != nil {
			permErr = p.err
			continue
		}
		if p.netns == host {
			continue
		}
		if chosen == nil {
			chosen = p
			continue
		}
		if p.netns != chosen.netns {
			return Sandbox{}, fmt.Errorf("finding pod %s: pid %d is in netns %d, pid %d in netns %d: %w",
				uid, chosen.pid, chosen.netns, p.pid, p.netns, ErrAmbiguousNetns)
		}
	}
	if chosen == nil {
		if permErr != nil {
			// Fail closed: a process we could not inspect may be the sandbox.
			return Sandbox{}, fmt.Errorf("finding pod %s: reading a pod process's network namespace (the agent needs CAP_SYS_PTRACE): %w", uid, permErr)
		}
		return Sandbox{}, fmt.Errorf("finding pod %s: %w", uid, ErrHostNetwork)
	}
	sb := Sandbox{
		UID:        uid,
		PID:        chosen.pid,
		Netns:      filepath.Join(s.proc(), strconv.Itoa(chosen.pid), "ns", "net"),
		NetnsInode: chosen.netns,
	}
	if s.Hierarchy.Path != "" && chosen.pc.V2 {
		dir, err := s.Hierarchy.Dir(chosen.pc.PodPath)
		if err != nil {
			return Sandbox{}, fmt.Errorf("finding pod %s: %w", uid, err)
		}
		sb.Cgroup = dir
	}
	return sb, nil
}

// OpenNetns opens the sandbox's network namespace and checks that it is
// still the pod's: the process may have exited and its pid been reused
// between the scan and now. The caller owns the returned file; while it is
// open the namespace stays alive and /proc/self/fd/<fd> names it.
func (s *Scanner) OpenNetns(sb Sandbox) (*os.File, error) {
	f, err := os.Open(sb.Netns)
	if err != nil {
		return nil, fmt.Errorf("opening the network namespace of pod %s: %w", sb.UID, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("opening the network namespace of pod %s: %w", sb.UID, err)
	}
	b, err := os.ReadFile(filepath.Join(s.proc(), strconv.Itoa(sb.PID), "cgroup"))
	pc, ok := ParsePodCgroup(string(b))
	if err != nil || !ok || pc.UID != sb.UID || st.Ino != sb.NetnsInode {
		f.Close()
		return nil, fmt.Errorf("opening the network namespace of pod %s: pid %d exited or changed since the scan; scan again", sb.UID, sb.PID)
	}
	return f, nil
}

// nsInode returns the inode of a /proc/<pid>/ns/* link's namespace.
func nsInode(p string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return 0, &os.PathError{Op: "stat", Path: p, Err: err}
	}
	return st.Ino, nil
}
