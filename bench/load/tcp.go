package load

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/nodemesh/nodemesh/bench/hist"
)

// roundTrip writes one byte and reads one back.
func roundTrip(c net.Conn, buf []byte) error {
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := c.Write(buf[:1]); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	if _, err := io.ReadFull(c, buf[:1]); err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	return nil
}

func runRR(ctx context.Context, d Dialer, cfg Config) (*Result, error) {
	c, err := d.DialContext(ctx, "tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", cfg.Addr, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	var lat hist.Hist
	var n uint64
	buf := []byte{'x'}
	w := newWindow(cfg)
	for {
		t0 := time.Now()
		if !t0.Before(w.to) {
			break
		}
		if err := roundTrip(c, buf); err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("rr workload: %w", ctx.Err())
			}
			// One connection: an error ends the run.
			return nil, fmt.Errorf("rr workload to %s: %w", cfg.Addr, err)
		}
		if w.in(t0) {
			n++
			lat.Record(int64(time.Since(t0)))
		}
	}
	return finish(cfg, &lat, nil, n, errSet{}, cfg.Duration, float64(2*n)), nil
}

func runCRR(ctx context.Context, d Dialer, cfg Config) (*Result, error) {
	var lat hist.Hist
	var n uint64
	var errs errSet
	buf := []byte{'x'}
	w := newWindow(cfg)
	for {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("crr workload: %w", err)
		}
		t0 := time.Now()
		if !t0.Before(w.to) {
			break
		}
		err := func() error {
			dctx, cancel := context.WithTimeout(ctx, ioTimeout)
			defer cancel()
			c, err := d.DialContext(dctx, "tcp", cfg.Addr)
			if err != nil {
				return fmt.Errorf("connecting to %s: %w", cfg.Addr, err)
			}
			defer c.Close()
			return roundTrip(c, buf)
		}()
		if !w.in(t0) {
			continue
		}
		if err != nil {
			errs.add(err)
			if errs.n > 100 && n == 0 {
				return nil, fmt.Errorf("crr workload: every connection fails: %w", errs.first)
			}
			continue
		}
		n++
		lat.Record(int64(time.Since(t0)))
	}
	return finish(cfg, &lat, nil, n, errs, cfg.Duration, float64(2*n)), nil
}

// bulkChunk is the write size of the bulk stream.
const bulkChunk = 128 << 10

func runBulk(ctx context.Context, d Dialer, cfg Config) (*Result, error) {
	c, err := d.DialContext(ctx, "tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", cfg.Addr, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	buf := make([]byte, bulkChunk)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	// One connection for warm-up and measurement (a second connection
	// would put a handshake in the window): the bytes written during the
	// warm-up are subtracted, and the window ends when the server has
	// confirmed receiving everything.
	start := time.Now()
	warmEnd := start.Add(cfg.Warmup)
	end := warmEnd.Add(cfg.Duration)
	var warmBytes, total int64
	warmed := cfg.Warmup == 0
	var measuredFrom time.Time
	if warmed {
		measuredFrom = start
	}
	for time.Now().Before(end) {
		_ = c.SetWriteDeadline(time.Now().Add(ioTimeout))
		n, err := c.Write(buf)
		total += int64(n)
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("bulk workload: %w", ctx.Err())
			}
			return nil, fmt.Errorf("bulk workload: writing to %s: %w", cfg.Addr, err)
		}
		if !warmed && !time.Now().Before(warmEnd) {
			warmed, warmBytes, measuredFrom = true, total, time.Now()
		}
	}
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		return nil, fmt.Errorf("bulk workload: connection %T cannot half-close", c)
	}
	if err := cw.CloseWrite(); err != nil {
		return nil, fmt.Errorf("bulk workload: half-closing: %w", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(ioTimeout + cfg.Duration))
	var got [8]byte
	if _, err := io.ReadFull(c, got[:]); err != nil {
		return nil, fmt.Errorf("bulk workload: reading the byte count from the server (does the path pass a half-close?): %w", err)
	}
	doneAt := time.Now()
	recv := int64(binary.BigEndian.Uint64(got[:]))
	if recv != total {
		return nil, fmt.Errorf("bulk workload: server received %d bytes, %d were sent", recv, total)
	}
	elapsed := doneAt.Sub(measuredFrom)
	// Everything written after the warm-up, until the server confirmed it.
	return finish(cfg, nil, nil, 0, errSet{}, elapsed, float64(total-warmBytes)), nil
}
