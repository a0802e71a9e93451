package load

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Ports the benchmark server listens on by default.
const (
	DefaultHTTPPort = 8080
	DefaultEchoPort = 9000
	DefaultSinkPort = 9001
)

// Server is the benchmark's server side: HTTP (answers every request with
// Size bytes after reading its body), echo (RR and CRR) and sink (Bulk:
// counts bytes until the client half-closes, answers the count as 8 bytes
// big-endian).
type Server struct {
	Size int
	Log  *slog.Logger

	wg  sync.WaitGroup
	lns []net.Listener
	hs  *http.Server
}

// Listen opens the three listeners on host (e.g. "" for every address)
// with the given ports. Listeners are plain TCP, not MPTCP, so that BPF
// socket maps can hold their sockets.
func (s *Server) Listen(ctx context.Context, host string, httpPort, echoPort, sinkPort int) error {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	network := "tcp"
	if ip := net.ParseIP(host); ip != nil && ip.To4() != nil {
		// Go makes "tcp" on 0.0.0.0 a dual-stack socket; IPv4 means IPv4.
		network = "tcp4"
	}
	for _, p := range []int{httpPort, echoPort, sinkPort} {
		ln, err := lc.Listen(ctx, network, net.JoinHostPort(host, strconv.Itoa(p)))
		if err != nil {
			for _, l := range s.lns {
				_ = l.Close()
			}
			s.lns = nil
			return fmt.Errorf("listening on port %d: %w", p, err)
		}
		s.lns = append(s.lns, ln)
	}
	return nil
}

// Addrs returns the HTTP, echo and sink addresses after Listen.
func (s *Server) Addrs() (httpAddr, echoAddr, sinkAddr string) {
	return s.lns[0].Addr().String(), s.lns[1].Addr().String(), s.lns[2].Addr().String()
}

// Serve serves until ctx ends, then closes everything and waits for its
// goroutines.
func (s *Server) Serve(ctx context.Context) error {
	if len(s.lns) != 3 {
		return errors.New("benchmark server: Serve before Listen")
	}
	log := s.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	body := make([]byte, s.Size)
	for i := range body {
		body[i] = 'A' + byte(i%26)
	}
	size := strconv.Itoa(s.Size)
	s.hs = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Length", size)
			w.Header().Set("Content-Type", "application/octet-stream")
			_, _ = w.Write(body)
		}),
		ReadHeaderTimeout: time.Minute,
		IdleTimeout:       5 * time.Minute,
	}
	conns := newConnSet()
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		if err := s.hs.Serve(s.lns[0]); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server stopped", "err", err)
		}
	}()
	go func() { defer s.wg.Done(); s.accept(s.lns[1], conns, echo) }()
	go func() { defer s.wg.Done(); s.accept(s.lns[2], conns, sink) }()
	<-ctx.Done()
	_ = s.hs.Close()
	for _, l := range s.lns[1:] {
		_ = l.Close()
	}
	conns.closeAll()
	s.wg.Wait()
	return nil
}

func (s *Server) accept(ln net.Listener, conns *connSet, handle func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if !conns.add(c) {
			_ = c.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer conns.remove(c)
			defer c.Close()
			handle(c)
		}()
	}
}

func echo(c net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func sink(c net.Conn) {
	n, err := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
	if err != nil {
		return
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	_, _ = c.Write(b[:])
}

// connSet tracks raw connections so Serve can close them at shutdown.
type connSet struct {
	mu     sync.Mutex
	m      map[net.Conn]struct{}
	closed bool
}

func newConnSet() *connSet { return &connSet{m: map[net.Conn]struct{}{}} }

func (s *connSet) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.m[c] = struct{}{}
	return true
}

func (s *connSet) remove(c net.Conn) {
	s.mu.Lock()
	delete(s.m, c)
	s.mu.Unlock()
}

func (s *connSet) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for c := range s.m {
		_ = c.Close()
	}
}
