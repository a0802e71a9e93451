package l7

import (
	"strings"
	"testing"
)

func TestOptedIn(t *testing.T) {
	en := map[string]string{LabelL7: ValueEnabled}
	dis := map[string]string{LabelL7: ValueDisabled}
	typo := map[string]string{LabelL7: "Enabled"}
	for _, tc := range []struct {
		name    string
		ns, svc map[string]string
		want    bool
	}{
		{"nothing", nil, nil, false},
		{"namespace", en, nil, true},
		{"service", nil, en, true},
		{"service opts out of namespace", en, dis, false},
		{"service opts in against namespace", dis, en, true},
		{"typo on service falls back to namespace", en, typo, true},
		{"typo on namespace is off", typo, nil, false},
	} {
		if got := OptedIn(tc.ns, tc.svc); got != tc.want {
			t.Errorf("%s: OptedIn = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestDeclaredProtocol(t *testing.T) {
	for in, want := range map[string]Protocol{
		"": Undeclared, "http": HTTP1, "HTTP": HTTP1, "kubernetes.io/h2c": H2C, "http2": H2C,
		"grpc": GRPC, "GRPC": GRPC, "tcp": TCP, "https": TCP, "tls": TCP,
		"kubernetes.io/ws": TCP, "kubernetes.io/wss": TCP, "mysql": TCP, "grpc-web": TCP,
	} {
		if got := DeclaredProtocol(in); got != want {
			t.Errorf("DeclaredProtocol(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestSniff(t *testing.T) {
	for _, tc := range []struct {
		in    string
		final bool
		want  Protocol
		more  bool
	}{
		{"", false, TCP, true},
		{"", true, TCP, false},
		{"G", false, TCP, true},
		{"GET", false, TCP, true},
		{"GET /", false, TCP, true},
		{"GET / HTTP/1.", false, TCP, true},
		{"GET / HTTP/1.1\r", false, TCP, true},
		{"GET / HTTP/1.1\r\n", false, HTTP1, false},
		{"GET / HTTP/1.1\n", false, HTTP1, false},
		{"POST /api?x=1 HTTP/1.0\r\nHost: a\r\n\r\n", false, HTTP1, false},
		{"PROPFIND /dav HTTP/1.1\r\n", false, HTTP1, false},
		{"GET / HTTP/1.1", true, TCP, false}, // no line end before EOF
		{"GET / HTTP/2.0\r\n", false, TCP, false},
		{"GET / HTTP/1.2\r\n", false, TCP, false},
		{"GET  / HTTP/1.1\r\n", false, TCP, false},
		{"get / HTTP/1.1\r\n", false, TCP, false},
		{"GET /\x00 HTTP/1.1\r\n", false, TCP, false},
		{"GET / HTTP/1.1 extra\r\n", false, TCP, false},
		{"GET / HTTX", false, TCP, false},
		{"\x16\x03\x01\x02\x00", false, TCP, false},             // TLS ClientHello
		{"\x00\x00\x00\x08\x04\xd2\x16\x2f", false, TCP, false}, // Postgres SSLRequest
		{"SSH-2.0-OpenSSH\r\n", false, TCP, false},
		{"ABCDEFGHIJKLMNOPQ", false, TCP, false}, // method too long
		{"PRI * HTTP/2.0\r\n", false, TCP, true},
		{"PRI * HTTP/2.0\r\n", true, TCP, false},
		{H2Preface, false, H2C, false},
		{H2Preface + "\x00\x00\x00\x04", false, H2C, false},
		{"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", false, TCP, false},
		{"GET /" + strings.Repeat("a", MaxSniff), false, TCP, false},
	} {
		got, more := Sniff([]byte(tc.in), tc.final)
		if got != tc.want || more != tc.more {
			t.Errorf("Sniff(%.40q, %v) = %v, more=%v; want %v, more=%v", tc.in, tc.final, got, more, tc.want, tc.more)
		}
	}
}

// FuzzSniff checks that Sniff never panics, that an undecided prefix never
// decides differently from the whole input: a verdict reached on a prefix
// (final TCP included) holds for every longer input.
func FuzzSniff(f *testing.F) {
	for _, s := range []string{"GET / HTTP/1.1\r\nHost: x\r\n\r\n", H2Preface, "\x16\x03\x01", "GET", "PRI * HTTP/2.0\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 4096 { // every prefix is sniffed: keep it quadratic in a small n
			return
		}
		full, _ := Sniff(b, true)
		for k := 0; k <= len(b); k++ {
			p, more := Sniff(b[:k], false)
			if !more && p != full {
				t.Fatalf("prefix %q decided %v, whole input %q decided %v", b[:k], p, b, full)
			}
			if !more {
				break
			}
		}
	})
}
