package bench

import (
	"crypto/aes"
	"crypto/cipher"
	"runtime"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/bench/hist"
	"github.com/nodemesh/nodemesh/bench/load"
)

// aesGCMThroughput seals 16 kB records (a TLS record's size) with
// AES-128-GCM on one locked OS thread until it has used 300 ms of that
// thread's CPU time, and returns bytes per CPU second: what one core can
// encrypt, independent of how busy the other core is.
func aesGCMThroughput() float64 {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	key := make([]byte, 16)
	block, err := aes.NewCipher(key)
	if err != nil {
		return 0
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return 0
	}
	nonce := make([]byte, aead.NonceSize())
	buf := make([]byte, 16<<10)
	out := make([]byte, 0, len(buf)+aead.Overhead())
	start := threadCPU()
	var n int64
	for threadCPU()-start < 300_000_000 {
		for i := 0; i < 64; i++ {
			nonce[0]++
			out = aead.Seal(out[:0], nonce, buf, nil)
			n += int64(len(buf))
		}
	}
	el := threadCPU() - start
	if el <= 0 {
		return 0
	}
	return float64(n) / (float64(el) / 1e9)
}

func threadCPU() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return ts.Nano()
}

func histOf(r *load.Result) (*hist.Hist, error) { return hist.FromSnapshot(r.Latency) }
