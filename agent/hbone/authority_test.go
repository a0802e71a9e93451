package hbone

import (
	"net/netip"
	"testing"
)

func TestParseAuthority(t *testing.T) {
	good := map[string]string{
		"10.0.0.5:8080":         "10.0.0.5:8080",
		"127.0.0.1:1":           "127.0.0.1:1",
		"[fd00::5]:65535":       "[fd00::5]:65535",
		"[2001:db8:0::1]:443":   "[2001:db8::1]:443",
		"255.255.255.254:15008": "255.255.255.254:15008",
	}
	for in, want := range good {
		got, err := ParseAuthority(in)
		if err != nil || got.String() != want {
			t.Errorf("ParseAuthority(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	bad := []string{
		"", "10.0.0.5", "10.0.0.5:", "10.0.0.5:0", "10.0.0.5:65536", "10.0.0.5:080",
		"10.0.0.5:+80", "10.0.0.5:8_0", "10.0.0.5: 80", "host:80", "pod.ns.svc:80",
		"fd00::5:80", "[10.0.0.5]:80", "[fe80::1%eth0]:80", "[::ffff:10.0.0.5]:80",
		"0.0.0.0:80", "[::]:80", "224.0.0.1:80", "10.0.0.5:80:80", "[fd00::5]",
		"010.0.0.5:80", "10.0.0.5:8080/path", "user@10.0.0.5:80",
	}
	for _, in := range bad {
		if got, err := ParseAuthority(in); err == nil {
			t.Errorf("ParseAuthority(%q) = %v, want an error", in, got)
		}
	}
}

func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{"10.0.0.5:8080", "[fd00::5]:80", "host:80", "[::ffff:1.2.3.4]:1", "1.2.3.4:0", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := ParseAuthority(s)
		if err != nil {
			return
		}
		if !ap.IsValid() || ap.Port() == 0 || ap.Addr().Zone() != "" || ap.Addr().Is4In6() ||
			ap.Addr().IsUnspecified() || ap.Addr().IsMulticast() {
			t.Fatalf("ParseAuthority(%q) accepted %v", s, ap)
		}
		// The canonical form parses back to the same value.
		again, err := ParseAuthority(ap.String())
		if err != nil || again != ap {
			t.Fatalf("canonical form %q of %q does not round-trip: %v, %v", ap.String(), s, again, err)
		}
		if netip.MustParseAddrPort(ap.String()) != ap {
			t.Fatalf("netip disagrees on %q", ap.String())
		}
	})
}
