package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/spec"
)

// matcher selects the names of one lab (or of all labs).
type matcher func(name string) bool

func labMatcher(id string) matcher {
	p := Prefix + id
	return func(n string) bool { return n == p || strings.HasPrefix(n, p+"-") }
}

func allMatcher(n string) bool { return strings.HasPrefix(n, Prefix) }

// Leftovers lists what of a lab (or, with id "", of any lab) exists on
// the machine: processes, cgroups, network namespaces, links, nftables
// tables and BPF pin directories. After Down it is empty.
func Leftovers(id string) ([]string, error) {
	m := matcher(allMatcher)
	if id != "" {
		m = labMatcher(id)
	}
	return inventory(m)
}

func inventory(m matcher) ([]string, error) {
	var out []string
	nss, err := netns.List("")
	if err != nil {
		return nil, err
	}
	for _, n := range nss {
		if m(n) {
			out = append(out, "netns "+n)
		}
	}
	links, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	for _, i := range links {
		if m(i.Name) {
			out = append(out, "link "+i.Name)
		}
	}
	if cg2, err := cgroup.Mount(); err == nil {
		ents, _ := os.ReadDir(cg2)
		for _, e := range ents {
			if e.IsDir() && m(e.Name()) {
				out = append(out, "cgroup "+filepath.Join(cg2, e.Name()))
			}
		}
	}
	tables, err := nftTables()
	if err == nil {
		for _, t := range tables {
			if m(t[1]) {
				out = append(out, "nft table "+t[0]+" "+t[1])
			}
		}
	}
	if ents, err := os.ReadDir(bpfFS); err == nil {
		for _, e := range ents {
			if m(e.Name()) {
				out = append(out, "bpf "+filepath.Join(bpfFS, e.Name()))
			}
		}
	}
	procs, err := labProcesses(m, "")
	if err != nil {
		return nil, err
	}
	for _, p := range procs {
		out = append(out, fmt.Sprintf("process %d (%s)", p.pid, p.why))
	}
	sort.Strings(out)
	return out, nil
}

// nftTables lists [family, name] of the root namespace's nftables tables.
func nftTables() ([][2]string, error) {
	out, err := exec.Command("nft", "list", "tables").Output()
	if err != nil {
		return nil, fmt.Errorf("listing nftables tables: %w", err)
	}
	var res [][2]string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "table" {
			res = append(res, [2]string{f[1], f[2]})
		}
	}
	return res, nil
}

type labProc struct {
	pid int
	why string
}

// labProcesses finds processes that belong to a lab: in one of its
// cgroups, in one of its network namespaces, or an etcd/kube-apiserver
// whose command line names stateDir. Scanning /proc (not just pid files)
// is what makes Down work after the creator died at any moment.
func labProcesses(m matcher, stateDir string) ([]labProc, error) {
	inodes := map[uint64]string{}
	nss, _ := netns.List("")
	for _, n := range nss {
		if m(n) {
			if ino, err := netns.Inode(netns.Path(n)); err == nil {
				inodes[ino] = n
			}
		}
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("listing processes: %w", err)
	}
	self := os.Getpid()
	var out []labProc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || !alive(pid) {
			continue
		}
		if cg, err := cgroup.Of(pid); err == nil {
			first := strings.SplitN(strings.TrimPrefix(cg, "/"), "/", 2)[0]
			if first != "" && m(first) {
				out = append(out, labProc{pid, "cgroup " + cg})
				continue
			}
		}
		if len(inodes) > 0 {
			if ino, err := netns.Inode(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil {
				if n, ok := inodes[ino]; ok {
					out = append(out, labProc{pid, "netns " + n})
					continue
				}
			}
		}
		if stateDir != "" {
			cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if err != nil {
				continue
			}
			args := bytes.Split(cmdline, []byte{0})
			base := filepath.Base(string(args[0]))
			if (base == "etcd" || base == "kube-apiserver") && bytes.Contains(cmdline, []byte(stateDir+"/")) {
				out = append(out, labProc{pid, base + " of " + stateDir})
			}
		}
	}
	return out, nil
}

// sweep removes everything of lab id whose state lives in stateDir.
func sweep(ctx context.Context, stateDir, id string, log *slog.Logger) error {
	return sweepMatching(ctx, stateDir, labMatcher(id), log)
}

// SweepAll removes every lab on the machine: all objects named with
// Prefix, and the state directories /run/nodemesh-* that hold a lab id.
func SweepAll(ctx context.Context) error {
	var errs []error
	dirs, _ := filepath.Glob("/run/nodemesh-*")
	for _, d := range dirs {
		if fi, err := os.Stat(filepath.Join(d, "id")); err == nil && !fi.IsDir() {
			if err := Down(ctx, d); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := sweepMatching(ctx, "", allMatcher, slog.New(slog.DiscardHandler)); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func sweepMatching(ctx context.Context, stateDir string, m matcher, log *slog.Logger) error {
	var errs []error
	// 1. Processes: everything in the lab's cgroups (cgroup.kill; this
	// includes etcd and kube-apiserver once adopted), the API server by
	// its pid files (a creator killed before adopting them), then by pid
	// anything left in the lab's namespaces or naming its state directory.
	cg2, cgErr := cgroup.Mount()
	var cgDirs []string
	if cgErr == nil {
		ents, _ := os.ReadDir(cg2)
		for _, e := range ents {
			if e.IsDir() && m(e.Name()) {
				cgDirs = append(cgDirs, filepath.Join(cg2, e.Name()))
			}
		}
	}
	kctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, d := range cgDirs {
		if err := cgroup.Kill(kctx, d); err != nil {
			errs = append(errs, err)
		}
	}
	if stateDir != "" {
		// After the cgroup kill these are zombies or gone, which Sweep
		// skips without waiting.
		apiserver.Sweep(filepath.Join(stateDir, "apiserver"))
	}
	for try := 0; try < 3; try++ {
		procs, err := labProcesses(m, stateDir)
		if err != nil {
			errs = append(errs, err)
			break
		}
		if len(procs) == 0 {
			break
		}
		for _, p := range procs {
			log.Debug("killing lab process", "pid", p.pid, "why", p.why)
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
		waitGone(kctx, procs)
	}
	// 2. Cgroups.
	for _, d := range cgDirs {
		if err := cgroup.Remove(kctx, d); err != nil {
			errs = append(errs, err)
		}
	}
	// 3. Network namespaces (their veths and routes go with them), then
	// links left in the root namespace (the bridge).
	nss, err := netns.List("")
	if err != nil {
		errs = append(errs, err)
	}
	var del []string
	for _, n := range nss {
		if m(n) {
			del = append(del, "netns del "+n)
		}
	}
	if len(del) > 0 {
		// -force: keep going past one failure, then recheck below.
		cmd := exec.CommandContext(ctx, "ip", "-force", "-batch", "-")
		cmd.Stdin = strings.NewReader(strings.Join(del, "\n") + "\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("removing network namespaces: %w: %s", err, strings.TrimSpace(string(out))))
		}
	}
	if links, err := net.Interfaces(); err == nil {
		var dl []string
		for _, i := range links {
			if m(i.Name) {
				dl = append(dl, "link del "+i.Name)
			}
		}
		if len(dl) > 0 {
			cmd := exec.CommandContext(ctx, "ip", "-force", "-batch", "-")
			cmd.Stdin = strings.NewReader(strings.Join(dl, "\n") + "\n")
			if out, err := cmd.CombinedOutput(); err != nil {
				// A veth whose peer's namespace just went away is gone already.
				log.Debug("removing links", "err", err, "out", string(out))
			}
		}
	}
	// 4. nftables tables in the root namespace (node tables died with
	// their namespaces).
	if tables, err := nftTables(); err == nil {
		for _, t := range tables {
			if m(t[1]) {
				if out, err := exec.CommandContext(ctx, "nft", "delete", "table", t[0], t[1]).CombinedOutput(); err != nil {
					errs = append(errs, fmt.Errorf("deleting nftables table %s %s: %w: %s", t[0], t[1], err, strings.TrimSpace(string(out))))
				}
			}
		}
	}
	// 5. BPF pins.
	if ents, err := os.ReadDir(bpfFS); err == nil {
		for _, e := range ents {
			if m(e.Name()) {
				if err := os.RemoveAll(filepath.Join(bpfFS, e.Name())); err != nil {
					errs = append(errs, fmt.Errorf("removing BPF pins: %w", err))
				}
			}
		}
	}
	// 6. Files.
	if stateDir != "" {
		if err := os.RemoveAll(stateDir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing the state directory: %w", err))
		}
	}
	left, err := inventory(m)
	if err != nil {
		errs = append(errs, err)
	} else if len(left) > 0 {
		errs = append(errs, fmt.Errorf("lab objects are left after the sweep: %s", strings.Join(left, "; ")))
	}
	return errors.Join(errs...)
}

func waitGone(ctx context.Context, procs []labProc) {
	for _, p := range procs {
		for alive(p.pid) {
			select {
			case <-ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
}

func cloneSpec(s *spec.Spec) *spec.Spec {
	b, err := json.Marshal(s)
	if err != nil {
		panic(fmt.Sprintf("lab: a spec does not marshal: %v", err)) // all spec types are plain data
	}
	var c spec.Spec
	if err := json.Unmarshal(b, &c); err != nil {
		panic(fmt.Sprintf("lab: a spec does not round-trip: %v", err))
	}
	return &c
}
