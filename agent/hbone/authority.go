package hbone

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Port is the well-known HBONE port, the same as Istio's.
const Port = 15008

// ALPN is the only application protocol an HBONE connection negotiates.
const ALPN = "h2"

// ErrBadAuthority is wrapped by every error of ParseAuthority.
var ErrBadAuthority = errors.New("invalid CONNECT authority")

// ParseAuthority parses the :authority of an HBONE CONNECT request. HBONE
// targets are always an IP literal and a port ("10.0.0.5:8080",
// "[fd00::5]:8080"); host names, zones, IPv4-mapped IPv6 addresses,
// unspecified or multicast addresses, port 0 and anything else are refused,
// because the authority is untrusted input that decides where the agent dials.
func ParseAuthority(s string) (netip.AddrPort, error) {
	if len(s) == 0 || len(s) > len("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535") {
		return netip.AddrPort{}, fmt.Errorf("%w %q: want ip:port", ErrBadAuthority, truncate(s))
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("%w %q: missing port", ErrBadAuthority, s)
	}
	host, portStr := s[:i], s[i+1:]
	bracketed := strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]")
	if bracketed {
		host = host[1 : len(host)-1]
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w %q: host is not an IP literal", ErrBadAuthority, s)
	}
	switch {
	case addr.Is6() && !bracketed:
		return netip.AddrPort{}, fmt.Errorf("%w %q: IPv6 address must be in brackets", ErrBadAuthority, s)
	case addr.Is4() && bracketed:
		return netip.AddrPort{}, fmt.Errorf("%w %q: IPv4 address must not be in brackets", ErrBadAuthority, s)
	case addr.Zone() != "":
		return netip.AddrPort{}, fmt.Errorf("%w %q: IPv6 zones are not allowed", ErrBadAuthority, s)
	case addr.Is4In6():
		return netip.AddrPort{}, fmt.Errorf("%w %q: IPv4-mapped IPv6 addresses are not allowed", ErrBadAuthority, s)
	case addr.IsUnspecified() || addr.IsMulticast():
		return netip.AddrPort{}, fmt.Errorf("%w %q: not a unicast address", ErrBadAuthority, s)
	}
	if len(portStr) == 0 || len(portStr) > 5 || portStr[0] == '0' {
		return netip.AddrPort{}, fmt.Errorf("%w %q: invalid port", ErrBadAuthority, s)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w %q: invalid port", ErrBadAuthority, s)
	}
	for _, c := range portStr {
		if c < '0' || c > '9' {
			return netip.AddrPort{}, fmt.Errorf("%w %q: invalid port", ErrBadAuthority, s)
		}
	}
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}
