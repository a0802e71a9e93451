package load

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/nodemesh/nodemesh/bench/hist"
)

// httpConn is one persistent HTTP/1.1 connection driven by hand, so that
// each connection's requests follow their own timetable exactly (a pooled
// client would reorder them across connections).
type httpConn struct {
	d    Dialer
	addr string
	req  []byte
	c    net.Conn
	br   *bufio.Reader
}

func (h *httpConn) close() {
	if h.c != nil {
		_ = h.c.Close()
		h.c, h.br = nil, nil
	}
}

// do sends one request and reads the whole response.
func (h *httpConn) do(ctx context.Context, req []byte, size int) error {
	if h.c == nil {
		c, err := h.d.DialContext(ctx, "tcp", h.addr)
		if err != nil {
			return fmt.Errorf("connecting to %s: %w", h.addr, err)
		}
		h.c, h.br = c, bufio.NewReaderSize(c, 16<<10)
	}
	_ = h.c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := h.c.Write(req); err != nil {
		h.close()
		return fmt.Errorf("writing request: %w", err)
	}
	resp, err := http.ReadResponse(h.br, nil)
	if err != nil {
		h.close()
		return fmt.Errorf("reading response: %w", err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		h.close()
		return fmt.Errorf("reading response body: %w", err)
	}
	if resp.StatusCode != http.StatusOK || n != int64(size) {
		h.close()
		return fmt.Errorf("response %s with %d body bytes, want 200 with %d: %w", resp.Status, n, size, errShort)
	}
	if resp.Close {
		h.close()
	}
	return nil
}

func httpRequest(addr string, size int) []byte {
	b := []byte("POST /bench HTTP/1.1\r\nHost: " + addr + "\r\nContent-Type: application/octet-stream\r\nContent-Length: " + strconv.Itoa(size) + "\r\n\r\n")
	body := make([]byte, size)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	return append(b, body...)
}

func runHTTP(ctx context.Context, d Dialer, cfg Config) (*Result, error) {
	addrOf := func(i int) string {
		if len(cfg.Addrs) > 0 {
			return cfg.Addrs[i%len(cfg.Addrs)]
		}
		return cfg.Addr
	}
	type part struct {
		lat, lag hist.Hist
		n        uint64
		errs     errSet
	}
	parts := make([]part, cfg.Conns)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Connect everything before the clock starts: connection set-up is not
	// part of a request's latency in this workload (CRR measures it).
	conns := make([]*httpConn, cfg.Conns)
	for i := range conns {
		conns[i] = &httpConn{d: d, addr: addrOf(i), req: httpRequest(addrOf(i), cfg.Size)}
		c, err := d.DialContext(ctx, "tcp", conns[i].addr)
		if err != nil {
			for _, h := range conns[:i] {
				h.close()
			}
			return nil, fmt.Errorf("opening connection %d of %d to %s: %w", i+1, cfg.Conns, conns[i].addr, err)
		}
		conns[i].c, conns[i].br = c, bufio.NewReaderSize(c, 16<<10)
	}
	w := newWindow(cfg)
	// A connection that falls behind keeps sending back to back; past
	// hardStop it gives up on the rest of its timetable.
	overrun := max(2*time.Second, cfg.Duration/2)
	hardStop := w.to.Add(overrun)
	var wg sync.WaitGroup
	for i := range conns {
		sched, ok := NewSchedule(cfg.Rate, cfg.Conns, i)
		if !ok {
			return nil, fmt.Errorf("rate %v/s over %d connections cannot be paced", cfg.Rate, cfg.Conns)
		}
		wg.Add(1)
		go func(h *httpConn, p *part) {
			defer wg.Done()
			defer h.close()
			var corr Corrector
			timer := time.NewTimer(time.Hour)
			defer timer.Stop()
			for i := 0; ; i++ {
				due := sched.Due(i)
				dueAt := w.start.Add(due)
				if !dueAt.Before(w.to) {
					return
				}
				if time.Now().After(hardStop) {
					// The path cannot sustain the rate: what is still due
					// in the window was never sent. Count it, or the
					// slowest scenario would look as good as the rest.
					var n uint64
					for j := i; w.start.Add(sched.Due(j)).Before(w.to); j++ {
						if w.in(w.start.Add(sched.Due(j))) {
							n++
						}
					}
					if n > 0 {
						p.errs.add(fmt.Errorf("%d requests due in the window were not sent by %s after its end: the path could not sustain %v requests/s", n, overrun, cfg.Rate))
						p.errs.n += n - 1
					}
					return
				}
				if wait := time.Until(dueAt); wait > 0 {
					timer.Reset(wait)
					select {
					case <-ctx.Done():
						return
					case <-timer.C:
					}
				} else if ctx.Err() != nil {
					return
				}
				sentAt := time.Now()
				err := h.do(ctx, h.req, cfg.Size)
				doneAt := time.Now()
				charged := corr.Charge(due, sentAt.Sub(w.start), doneAt.Sub(w.start))
				if !w.in(dueAt) {
					continue
				}
				if err != nil {
					p.errs.add(err)
					continue
				}
				p.n++
				p.lat.Record(int64(charged))
				if sentAt.After(dueAt) && charged <= doneAt.Sub(sentAt) {
					// Not held up by the system: the generator's own lag.
					p.lag.Record(int64(sentAt.Sub(dueAt)))
				} else {
					p.lag.Record(0)
				}
			}
		}(conns[i], &parts[i])
	}
	wg.Wait()
	var lat, lag hist.Hist
	var n uint64
	var errs errSet
	for i := range parts {
		lat.Merge(&parts[i].lat)
		lag.Merge(&parts[i].lag)
		n += parts[i].n
		errs.n += parts[i].errs.n
		if errs.first == nil {
			errs.first = parts[i].errs.first
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("http workload: %w", err)
	}
	return finish(cfg, &lat, &lag, n, errs, cfg.Duration, float64(n)*float64(2*cfg.Size)), nil
}
