package hbone_test

import (
	"encoding/binary"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// The benchmarks run the hot path of the tunnel in-process over loopback
// TCP: application socket -> client Relay -> mTLS HTTP/2 -> server Relay
// -> application socket, with real TLS 1.3. cpu-us/op and cpu-us/MB are
// the CPU time of the whole process (both agents' ends and the
// applications), steadier than wall time on a shared machine.

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkRelayRoundTrip is a 64-byte request/response on one open
// tunnel; allocs/op must be 0.
func BenchmarkRelayRoundTrip(b *testing.B) {
	e := newRelayEnv(b, func(c net.Conn) {
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}, nil)
	app, _ := e.dial(b)
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	for range 100 { // warm up: windows, buffers, pools
		app.Write(msg)
		io.ReadFull(app, buf)
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for b.Loop() {
		if _, err := app.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(app, buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
	app.Close()
}

// BenchmarkRelayBulk uploads 64 KiB per op through one tunnel.
func BenchmarkRelayBulk(b *testing.B) {
	e := newRelayEnv(b, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		var out [8]byte
		binary.BigEndian.PutUint64(out[:], uint64(n))
		c.Write(out[:])
		c.(*net.TCPConn).CloseWrite()
	}, nil)
	app, _ := e.dial(b)
	chunk := make([]byte, 64<<10)
	for range 16 {
		app.Write(chunk)
	}
	sent := uint64(16 * len(chunk))
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	var measured uint64
	for b.Loop() {
		if _, err := app.Write(chunk); err != nil {
			b.Fatal(err)
		}
		measured += uint64(len(chunk))
	}
	sent += measured
	app.CloseWrite()
	var got [8]byte
	if _, err := io.ReadFull(app, got[:]); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if n := binary.BigEndian.Uint64(got[:]); n != sent {
		b.Fatalf("application received %d bytes, sent %d", n, sent)
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Microsecond)/(float64(measured)/1e6), "cpu-us/MB")
}
