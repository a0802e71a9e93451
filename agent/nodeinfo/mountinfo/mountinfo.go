// Package mountinfo parses /proc/<pid>/mountinfo (proc(5)). It is the one
// mount-table parser of the tree: the agent finds the cgroup v2 hierarchy
// with it (agent/nodeinfo), the capture loader its own cgroup (redirect),
// and the lab its cgroup hierarchies and leftover mounts (lab/cgroup,
// lab/cluster). It imports nothing of this module, so all of them can.
package mountinfo

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Mount is one line of /proc/<pid>/mountinfo (proc(5)).
type Mount struct {
	ID, Parent int
	// Root is the path, inside the filesystem, that is mounted. For cgroup
	// filesystems the kernel shows it relative to the reader's cgroup
	// namespace: "/" for the namespace root, "/../.." for an ancestor.
	Root string
	// MountPoint is where it is mounted, in the reader's mount namespace.
	MountPoint string
	// Options are the per-mount options ("rw,relatime"), Optional the
	// optional fields ("shared:5 master:1").
	Options  string
	Optional []string
	// FSType ("cgroup2", "cgroup", "bpf", ...), Source and SuperOptions
	// follow the " - " separator.
	FSType, Source, SuperOptions string
}

// Read parses <proc>/self/mountinfo ("/proc" when proc is empty): the mount
// table as this process sees it.
func Read(proc string) ([]Mount, error) {
	if proc == "" {
		proc = "/proc"
	}
	f, err := os.Open(filepath.Join(proc, "self", "mountinfo"))
	if err != nil {
		return nil, fmt.Errorf("reading mountinfo: %w", err)
	}
	defer f.Close()
	return Parse(f)
}

// Parse parses a /proc/<pid>/mountinfo stream. A malformed line is
// an error naming its number: a mount table that cannot be read cannot be
// trusted to say where cgroups are.
func Parse(r io.Reader) ([]Mount, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var out []Mount
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			continue
		}
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			return nil, fmt.Errorf("parsing mountinfo line %d: no \" - \" separator: %q", n, line)
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 6 || len(qf) < 2 {
			return nil, fmt.Errorf("parsing mountinfo line %d: too few fields: %q", n, line)
		}
		id, err1 := strconv.Atoi(pf[0])
		parent, err2 := strconv.Atoi(pf[1])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("parsing mountinfo line %d: bad mount ids: %q", n, line)
		}
		m := Mount{
			ID: id, Parent: parent,
			Root:       unescapeOctal(pf[3]),
			MountPoint: unescapeOctal(pf[4]),
			Options:    pf[5],
			Optional:   pf[6:],
			FSType:     qf[0],
			Source:     unescapeOctal(qf[1]),
		}
		if len(qf) > 2 {
			m.SuperOptions = qf[2]
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading mountinfo: %w", err)
	}
	return out, nil
}

// unescapeOctal undoes the kernel's octal escapes in mountinfo paths
// (\040 space, \011 tab, \012 newline, \134 backslash).
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
