package redirect

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/nodemesh/nodemesh/agent/nodeinfo/mountinfo"
)

func TestKeyFromIPRoundTrip(t *testing.T) {
	for _, s := range []string{"10.211.0.2", "255.1.2.3", "::ffff:10.0.0.1", "fd00:211::2", "2001:db8::ff00:42:8329"} {
		ip := netip.MustParseAddr(s)
		fam, a := keyFromIP(ip)
		got := ipFromKey(fam, a)
		if got != ip.Unmap() {
			t.Errorf("%s: round trip gave %s", s, got)
		}
		if ip.Unmap().Is4() && fam != 2 || !ip.Unmap().Is4() && fam != 10 {
			t.Errorf("%s: family %d", s, fam)
		}
	}
	// Network byte order: the first octet is the lowest byte of word 0 on
	// little-endian hosts, as the kernel stores user_ip4.
	_, a := keyFromIP(netip.MustParseAddr("10.0.0.1"))
	if a[0] != 0x0100000a {
		t.Errorf("10.0.0.1 as %#x, want 0x0100000a", a[0])
	}
}

func TestWithin(t *testing.T) {
	tests := []struct {
		path, dir string
		want      bool
	}{
		{"/sys/fs/cgroup/kubepods/pod1", "/sys/fs/cgroup/kubepods", true},
		{"/sys/fs/cgroup/kubepods", "/sys/fs/cgroup/kubepods", true},
		{"/sys/fs/cgroup/kubepods/", "/sys/fs/cgroup/kubepods", true},
		{"/sys/fs/cgroup/kubepods2/pod1", "/sys/fs/cgroup/kubepods", false},
		{"/sys/fs/cgroup", "/sys/fs/cgroup/kubepods", false},
		{"/sys/fs/cgroup/kubepods/../system.slice", "/sys/fs/cgroup/kubepods", false},
		{"/sys/fs/cgroup/..foo", "/sys/fs/cgroup", true},
	}
	for _, tt := range tests {
		if got := within(tt.path, tt.dir); got != tt.want {
			t.Errorf("within(%q, %q) = %v, want %v", tt.path, tt.dir, got, tt.want)
		}
	}
}

func TestFirstMount(t *testing.T) {
	const hybrid = `25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,name=systemd
40 25 0:35 / /sys/fs/bpf\040x rw,relatime shared:15 - bpf bpf rw,mode=700
`
	tests := []struct{ fstype, want, err string }{
		{"cgroup2", "/sys/fs/cgroup/unified", ""},
		{"bpf", "/sys/fs/bpf x", ""},
		{"nfs", "", "no nfs filesystem is mounted"},
	}
	for _, tt := range tests {
		mounts, err := mountinfo.Parse(strings.NewReader(hybrid))
		if err != nil {
			t.Fatal(err)
		}
		got, err := firstMount(mounts, tt.fstype)
		if got != tt.want || (err == nil) != (tt.err == "") || err != nil && !strings.Contains(err.Error(), tt.err) {
			t.Errorf("%s: got %q, %v; want %q, %q", tt.fstype, got, err, tt.want, tt.err)
		}
	}
}

func TestLoadRejectsBadConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no root", Config{}, "no cgroup root given"},
		{"not cgroup2", Config{CgroupRoot: t.TempDir()}, "not in a cgroup v2 hierarchy"},
		{"missing", Config{CgroupRoot: "/nonexistent/nmtcap"}, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Load(context.Background(), tt.cfg)
			if err == nil {
				c.Close()
				t.Fatal("Load accepted a bad config")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}
