package proxy_test

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/hbone"
)

// The benchmarks run the whole in-process path over loopback TCP: client
// -> outbound listener -> HBONE (mTLS 1.3, HTTP/2) -> inbound -> the
// application, and the same without the mesh ("direct") and through
// plaintext passthrough, so ratios can be read from one run.

func benchConn(b *testing.B, f *fixture, kind string) net.Conn {
	switch kind {
	case "direct":
		c, err := net.Dial("tcp", f.b1.app.String())
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		return c
	case "passthrough":
		return f.dial(f.c.app)
	case "hbone":
		return f.dial(f.b1.app)
	}
	b.Fatalf("unknown kind %q", kind)
	return nil
}

// BenchmarkEcho is a 64-byte request/response round trip on one open
// connection.
func BenchmarkEcho(b *testing.B) {
	for _, kind := range []string{"direct", "passthrough", "hbone"} {
		b.Run(kind, func(b *testing.B) {
			f := newFixture(b, fixtureOpts{})
			c := benchConn(b, f, kind)
			msg := make([]byte, 64)
			buf := make([]byte, 64)
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime()
			for b.Loop() {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
		})
	}
}

// sink reads until EOF and answers with the byte count.
func sink(c net.Conn) {
	n, _ := io.Copy(io.Discard, c)
	var out [8]byte
	binary.BigEndian.PutUint64(out[:], uint64(n))
	c.Write(out[:])
	c.(*net.TCPConn).CloseWrite()
}

// BenchmarkBulk uploads 64 KiB per op through one connection and reports
// MB/s. The hbone variants vary the HTTP/2 receive windows (per stream /
// per connection) and the largest frame size, to pick the defaults.
func BenchmarkBulk(b *testing.B) {
	type variant struct {
		name string
		kind string
		flow hbone.FlowControl
	}
	vs := []variant{
		{"direct", "direct", hbone.FlowControl{}},
		{"passthrough", "passthrough", hbone.FlowControl{}},
		{"hbone-default", "hbone", hbone.FlowControl{}},
	}
	for _, w := range []int32{64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20} {
		vs = append(vs, variant{fmt.Sprintf("hbone-window=%dk", w>>10), "hbone", hbone.FlowControl{StreamWindow: w, ConnWindow: max(w, 1<<20) * 4, MaxFrameSize: 16 << 10}})
	}
	for _, fs := range []uint32{16 << 10, 64 << 10, 256 << 10, 1 << 20} {
		vs = append(vs, variant{fmt.Sprintf("hbone-frame=%dk", fs>>10), "hbone", hbone.FlowControl{MaxFrameSize: fs}})
	}
	for _, v := range vs {
		b.Run(v.name, func(b *testing.B) {
			f := newFixture(b, fixtureOpts{app: sink, flow: v.flow})
			c := benchConn(b, f, v.kind).(*net.TCPConn)
			chunk := make([]byte, 64<<10)
			b.SetBytes(int64(len(chunk)))
			b.ReportAllocs()
			b.ResetTimer()
			var sent uint64
			cpu0 := cpuTime()
			for b.Loop() {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
				sent += uint64(len(chunk))
			}
			c.CloseWrite()
			var got [8]byte
			if _, err := io.ReadFull(c, got[:]); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if n := binary.BigEndian.Uint64(got[:]); n != sent {
				b.Fatalf("application received %d bytes, sent %d", n, sent)
			}
			// CPU time per MB of the whole process (client, both agents,
			// application): steadier than MB/s on a shared machine.
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/(float64(sent)/1e6), "cpu-us/MB")
		})
	}
}

// cpuTime returns the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkConnect opens a new application connection per op and does one
// 64-byte exchange, on a warm pool (no handshake after the first).
func BenchmarkConnect(b *testing.B) {
	for _, kind := range []string{"direct", "passthrough", "hbone"} {
		b.Run(kind, func(b *testing.B) {
			f := newFixture(b, fixtureOpts{})
			msg := make([]byte, 64)
			b.ReportAllocs()
			cpu0 := cpuTime()
			for b.Loop() {
				var c net.Conn
				switch kind {
				case "direct":
					var err error
					if c, err = net.Dial("tcp", f.b1.app.String()); err != nil {
						b.Fatal(err)
					}
				case "passthrough":
					c = f.dial(f.c.app)
				case "hbone":
					c = f.dial(f.b1.app)
				}
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, msg); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
			if kind == "hbone" {
				if st := f.pool1.Stats(); st.Handshakes != 1 {
					b.Fatalf("warm pool did %d handshakes", st.Handshakes)
				}
			}
		})
	}
}

// BenchmarkAESGCM is the single-core ceiling for TLS 1.3's bulk cipher
// (AES-128-GCM, 16 KiB records), to compare with BenchmarkBulk/hbone.
func BenchmarkAESGCM(b *testing.B) {
	block, err := aes.NewCipher(make([]byte, 16))
	if err != nil {
		b.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		b.Fatal(err)
	}
	nonce := make([]byte, aead.NonceSize())
	rec := make([]byte, 16<<10)
	out := make([]byte, 0, len(rec)+aead.Overhead())
	b.SetBytes(int64(len(rec)))
	b.ReportAllocs()
	cpu0 := cpuTime()
	for b.Loop() {
		out = aead.Seal(out[:0], nonce, rec, nil)
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/(float64(b.N)*float64(len(rec))/1e6), "cpu-us/MB")
}
