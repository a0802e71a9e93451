package mountinfo

import (
	"strings"
	"testing"
)

const sample = `23 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
812 700 0:310 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
830 812 0:23 /../../../.. /host/sys/fs/cgroup ro,relatime master:4 - cgroup2 cgroup2 rw,nsdelegate
831 812 0:24 / /sys/fs/bpf rw,relatime master:5 - bpf bpf
99 812 0:50 / /mnt/with\040space\134x rw shared:7 master:2 - tmpfs my\040src rw
`

func TestParse(t *testing.T) {
	m, err := Parse(strings.NewReader(sample + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 5 {
		t.Fatalf("got %d mounts, want 5", len(m))
	}
	h := m[2]
	if h.ID != 830 || h.Parent != 812 || h.Root != "/../../../.." || h.MountPoint != "/host/sys/fs/cgroup" ||
		h.FSType != "cgroup2" || h.Source != "cgroup2" || h.SuperOptions != "rw,nsdelegate" || h.Options != "ro,relatime" ||
		len(h.Optional) != 1 || h.Optional[0] != "master:4" {
		t.Errorf("mount 830 parsed as %+v", h)
	}
	if b := m[3]; b.FSType != "bpf" || b.SuperOptions != "" {
		t.Errorf("mount without super options parsed as %+v", b)
	}
	e := m[4]
	if e.MountPoint != `/mnt/with space\x` || e.Source != "my src" || len(e.Optional) != 2 || e.Optional[1] != "master:2" {
		t.Errorf("escaped mount parsed as %+v", e)
	}
}

func TestParseErrors(t *testing.T) {
	for _, bad := range []string{
		"41 31 0:38 / /sys/fs/cgroup/unified rw,relatime cgroup2 cgroup2 rw\n", // no separator
		"41 31 0:38 / - cgroup2 cgroup2 rw\n",                                  // too few fields
		"x 31 0:38 / /a rw - cgroup2 cgroup2 rw\n",                             // bad id
	} {
		if _, err := Parse(strings.NewReader(bad)); err == nil || !strings.Contains(err.Error(), "line 1") {
			t.Errorf("Parse(%q) = %v, want an error naming line 1", bad, err)
		}
	}
}

func TestReadSelf(t *testing.T) {
	m, err := Read("")
	if err != nil {
		t.Fatal(err)
	}
	var root bool
	for _, x := range m {
		root = root || x.MountPoint == "/"
	}
	if !root {
		t.Errorf("this process's mount table has no / mount: %+v", m)
	}
}

func FuzzParse(f *testing.F) {
	f.Add(sample)
	f.Add("1 2 3 4 /a\\040b x - bpf bpf rw\n - \n")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		m, err := Parse(strings.NewReader(s))
		if err != nil {
			return
		}
		for _, x := range m {
			if x.MountPoint == "" || x.FSType == "" {
				t.Errorf("mount without mount point or type accepted: %+v", x)
			}
		}
	})
}
