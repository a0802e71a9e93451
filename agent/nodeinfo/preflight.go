package nodeinfo

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// MinKernel is the oldest kernel with everything capture uses (sk_lookup
// with bpf_sk_assign, netns cookies in cgroup sock_addr programs and in
// sockops, socket storage): the first LTS that has it all (docs/capture.md
// lists each feature's version).
const MinKernel = "5.15"

// PreflightConfig says what the start-up checks must find.
type PreflightConfig struct {
	// Proc is the proc mount, "/proc" when empty.
	Proc string
	// PinDir is where capture pins its maps and links
	// (redirect.DefaultPinDir when empty).
	PinDir string
	// RequireBPFFS demands that PinDir already be on a bpf filesystem. On
	// a real node the agent runs in a container: a bpffs it mounted itself
	// would die with the container and take the pins, and with them
	// capture, along (plaintext while the agent restarts). The lab runs
	// agents in the host's mount namespace and may mount it.
	RequireBPFFS bool
	// RequireHostPID demands the host's PID namespace, which pod discovery
	// (Scanner) needs, and CAP_SYS_PTRACE to read other users' netns links.
	RequireHostPID bool
	// NodeCgroupNS is the node's cgroup namespace, read when
	// RequireHostPID; NodeCgroupNS (the package constant) when empty.
	NodeCgroupNS string
}

// Result is the outcome of one check: Err is nil when it passed, otherwise
// it says what is wrong and what to change.
type Result struct {
	Name string
	Err  error
}

// Report is the outcome of Preflight.
type Report struct {
	Results []Result
	// Hierarchy is the cgroup v2 hierarchy found (zero if none).
	Hierarchy Hierarchy
}

// Err is nil when every check passed, else one error listing every failure.
func (r Report) Err() error {
	var errs []error
	for _, res := range r.Results {
		if res.Err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", res.Name, res.Err))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("this node cannot run nodemesh capture (Linux %s or later with cgroup v2, BPF and BTF is needed; see docs/install.md):\n%w",
		MinKernel, errors.Join(errs...))
}

// capability names the agent needs, and what for.
var neededCaps = []struct {
	bit  int
	name string
	why  string
}{
	{unix.CAP_BPF, "CAP_BPF", "load the capture programs and maps"},
	{unix.CAP_NET_ADMIN, "CAP_NET_ADMIN", "attach cgroup and sk_lookup programs, set SO_MARK"},
	{unix.CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "enter pod network namespaces (setns)"},
}

var ptraceCap = struct {
	bit  int
	name string
	why  string
}{unix.CAP_SYS_PTRACE, "CAP_SYS_PTRACE", "open the network namespace links of pod processes owned by other users"}

// Preflight runs the start-up checks: capabilities, the bpf() syscall, the
// program, map and helper types capture uses, kernel BTF, cgroup v2, bpffs
// and, if asked, the host PID namespace. It runs them all and reports every
// failure at once, so an operator fixes a node in one go.
func Preflight(cfg PreflightConfig) Report {
	proc := cfg.Proc
	if proc == "" {
		proc = "/proc"
	}
	pinDir := cfg.PinDir
	if pinDir == "" {
		pinDir = "/sys/fs/bpf/nodemesh"
	}
	var r Report
	add := func(name string, err error) { r.Results = append(r.Results, Result{Name: name, Err: err}) }

	status, statusErr := os.ReadFile(filepath.Join(proc, "self", "status"))
	add("capabilities", checkCaps(status, statusErr, cfg.RequireHostPID))

	bpfErr := checkBPF()
	add("bpf syscall", bpfErr)
	if bpfErr == nil {
		add("program types", checkProgramTypes())
		add("map types", checkMapTypes())
		add("helpers", checkHelpers())
	}
	add("kernel BTF", checkBTF())

	var h Hierarchy
	var err error
	if cfg.RequireHostPID {
		h, err = DiscoverNodeHierarchy(proc, cfg.NodeCgroupNS)
	} else {
		h, err = DiscoverHierarchy(proc)
	}
	if err == nil {
		r.Hierarchy = h
	}
	add("cgroup v2", err)
	add("bpffs", checkBPFFS(pinDir, cfg.RequireBPFFS))
	if cfg.RequireHostPID {
		add("host PID namespace", checkHostPID(status, statusErr))
	}
	return r
}

// capEff returns the effective capability set from /proc/self/status.
func capEff(status []byte) (uint64, error) {
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return 0, fmt.Errorf("parsing CapEff %q: %w", strings.TrimSpace(v), err)
			}
			return n, nil
		}
	}
	return 0, errors.New("no CapEff line in /proc/self/status")
}

func checkCaps(status []byte, statusErr error, ptrace bool) error {
	if statusErr != nil {
		return fmt.Errorf("reading /proc/self/status: %w", statusErr)
	}
	eff, err := capEff(status)
	if err != nil {
		return err
	}
	have := func(bit int) bool { return eff&(1<<uint(bit)) != 0 }
	var missing []string
	for _, c := range neededCaps {
		// Before Linux 5.8 CAP_SYS_ADMIN stood in for CAP_BPF.
		if c.bit == unix.CAP_BPF && have(unix.CAP_SYS_ADMIN) {
			continue
		}
		if !have(c.bit) {
			missing = append(missing, fmt.Sprintf("%s (to %s)", c.name, c.why))
		}
	}
	if ptrace && !have(ptraceCap.bit) {
		missing = append(missing, fmt.Sprintf("%s (to %s)", ptraceCap.name, ptraceCap.why))
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing capabilities %s; add them to the agent container's securityContext.capabilities.add (manifests/base/agent/daemonset.yaml)",
			strings.Join(missing, ", "))
	}
	return nil
}

// explain turns a probe error into an actionable one.
func explain(what string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ebpf.ErrNotSupported):
		return fmt.Errorf("the kernel does not support %s (needs Linux %s or later): %w", what, MinKernel, err)
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("probing %s: permission denied (needs CAP_BPF and CAP_NET_ADMIN, and a seccomp/AppArmor profile that allows bpf()): %w", what, err)
	}
	return fmt.Errorf("probing %s: %w", what, err)
}

// checkBPF makes one real bpf() call: it tells a kernel without
// CONFIG_BPF_SYSCALL or a sandbox that forbids it from everything else.
func checkBPF() error {
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		return explain("the bpf() syscall", err)
	}
	return m.Close()
}

func checkProgramTypes() error {
	var errs []error
	for _, pt := range []ebpf.ProgramType{ebpf.CGroupSockAddr, ebpf.SockOps, ebpf.SkMsg, ebpf.SkLookup} {
		errs = append(errs, explain("program type "+pt.String(), features.HaveProgramType(pt)))
	}
	return errors.Join(errs...)
}

func checkMapTypes() error {
	var errs []error
	for _, mt := range []ebpf.MapType{ebpf.Hash, ebpf.LRUHash, ebpf.PerCPUArray, ebpf.SockHash, ebpf.SockMap, ebpf.SkStorage} {
		errs = append(errs, explain("map type "+mt.String(), features.HaveMapType(mt)))
	}
	return errors.Join(errs...)
}

func checkHelpers() error {
	var errs []error
	for _, h := range []struct {
		pt ebpf.ProgramType
		fn asm.BuiltinFunc
	}{
		{ebpf.CGroupSockAddr, asm.FnGetNetnsCookie},
		{ebpf.CGroupSockAddr, asm.FnGetSocketCookie},
		{ebpf.SockOps, asm.FnSockHashUpdate},
		{ebpf.SkMsg, asm.FnMsgRedirectHash},
		{ebpf.SkLookup, asm.FnSkAssign},
	} {
		errs = append(errs, explain(fmt.Sprintf("helper %s in %s programs", h.fn, h.pt), features.HaveProgramHelper(h.pt, h.fn)))
	}
	return errors.Join(errs...)
}

// checkBTF: socket-storage maps and CO-RE need the kernel's BTF.
func checkBTF() error {
	if _, err := btf.LoadKernelSpec(); err != nil {
		return fmt.Errorf("loading kernel BTF (/sys/kernel/btf/vmlinux; build the kernel with CONFIG_DEBUG_INFO_BTF=y): %w", err)
	}
	return nil
}

// checkBPFFS: the pin directory, or its nearest existing parent, must be on
// bpffs (or, when allowed, be somewhere bpffs can be mounted).
func checkBPFFS(pinDir string, require bool) error {
	probe := pinDir
	for {
		var st unix.Statfs_t
		err := unix.Statfs(probe, &st)
		if err == nil {
			if st.Type == unix.BPF_FS_MAGIC {
				return nil
			}
			if require {
				return fmt.Errorf("%s is not on a bpf filesystem (found %s on %s); mount bpffs on the host (mount -t bpf bpf /sys/fs/bpf, or systemd's sys-fs-bpf.mount) and mount /sys/fs/bpf into the agent",
					pinDir, fsName(st.Type), probe)
			}
			return nil // the agent mounts bpffs itself
		}
		if !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("checking bpffs at %s: %w", probe, err)
		}
		parent := filepath.Dir(probe)
		if parent == probe {
			return fmt.Errorf("checking bpffs for %s: no existing parent directory", pinDir)
		}
		probe = parent
	}
}

func fsName(magic int64) string {
	switch magic {
	case unix.SYSFS_MAGIC:
		return "sysfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	}
	return fmt.Sprintf("filesystem 0x%x", magic)
}

// checkHostPID: in the node's initial PID namespace a process has one pid;
// the NSpid line lists one pid per nested namespace level.
func checkHostPID(status []byte, statusErr error) error {
	if statusErr != nil {
		return fmt.Errorf("reading /proc/self/status: %w", statusErr)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "NSpid:"); ok {
			if n := len(strings.Fields(v)); n != 1 {
				return fmt.Errorf("the agent runs in a nested PID namespace (NSpid has %d levels): pod discovery reads the pods' processes in /proc, set hostPID: true on the agent DaemonSet", n)
			}
			return nil
		}
	}
	return errors.New("no NSpid line in /proc/self/status (Linux 4.1+ has one)")
}
