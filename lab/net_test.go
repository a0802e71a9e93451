package lab

import (
	"net/netip"
	"testing"
)

func TestIPv6Plan(t *testing.T) {
	for _, tt := range []struct{ pfx, v4, want string }{
		{"fd4e:4d:0:1::/96", "10.244.2.2", "fd4e:4d:0:1::af4:202"},
		{"fd4e:4d:0:2::/96", "10.250.0.1", "fd4e:4d:0:2::afa:1"},
		{"fd4e:4d:0:1::/96", "0.0.0.1", "fd4e:4d:0:1::1"},
	} {
		got, err := embed6(netip.MustParsePrefix(tt.pfx), tt.v4)
		if err != nil || got.String() != tt.want {
			t.Errorf("embed6(%s, %s) = %v, %v; want %s", tt.pfx, tt.v4, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "fd00::1", "10.0.0.256"} {
		if _, err := embed6(pod6Prefix, bad); err == nil {
			t.Errorf("embed6(%q): no error", bad)
		}
	}
	p, err := embedPrefix6(pod6Prefix, "10.244.2.0/24")
	if err != nil || p.String() != "fd4e:4d:0:1::af4:200/120" {
		t.Errorf("embedPrefix6(10.244.2.0/24) = %v, %v", p, err)
	}
	// Every pod address of the node's IPv4 range maps into its IPv6 range,
	// and only those: the node routes are right for each pod.
	pod, _ := embed6(pod6Prefix, "10.244.2.77")
	other, _ := embed6(pod6Prefix, "10.244.3.77")
	if !p.Contains(pod) || p.Contains(other) {
		t.Errorf("%s: contains %s = %v, %s = %v", p, pod, p.Contains(pod), other, p.Contains(other))
	}
	if _, err := embedPrefix6(pod6Prefix, "fd00::/64"); err == nil {
		t.Error("embedPrefix6 took an IPv6 prefix")
	}
}
