// Package workload is the lab's built-in pod software, so pods have real
// servers and clients without container images:
//
//	http --port P [--port P2 ...]   HTTP/1.1 server answering every request
//	                                with a JSON Reply saying who it is and
//	                                what it saw (remote and local address)
//	grpc --port P                   gRPC health service (grpc.health.v1) in
//	                                h2c, naming the pod in x-nodemesh-pod
//	tcp-echo --port P               echoes every byte back
//	udp-echo --port P               echoes every datagram back
//	get URL                         prints the body of a GET (exit 1 on a
//	                                non-2xx status or a network error)
//	requests [--header n=v] [--parallel N] URL...
//	                                GETs every URL in order on one kept-alive
//	                                connection per host (with --parallel, N
//	                                at a time on up to N connections), printing
//	                                one JSON Result line each, in URL order
//	                                (any status)
//	grpc-check [--n N] [--header n=v] HOST:PORT
//	                                calls Health/Check N times on one
//	                                connection, printing a GRPCResult line each
//	tcp ADDR MESSAGE                sends MESSAGE, half-closes, prints the reply
//	udp ADDR MESSAGE                sends MESSAGE as a datagram, prints the reply
//	sleep                           blocks until SIGTERM
//
// They run as `nodemeshctl lab workload <name> ...` and read the pod they
// are in from the NODEMESH_POD_* variables the lab sets (the lab's
// downward API).
package workload

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Environment variables the lab sets in every pod process.
const (
	EnvPodName      = "NODEMESH_POD_NAME"
	EnvPodNamespace = "NODEMESH_POD_NAMESPACE"
	EnvPodIP        = "NODEMESH_POD_IP"
	EnvNodeName     = "NODEMESH_NODE_NAME"
)

// Request headers the http workload acts on, for L7 tests: HeaderDelay (a
// Go duration, at most a minute) delays the answer; HeaderFailOnce answers
// 503 the first time this pod sees its value; HeaderStatus (100-599)
// answers every request with that status, after the delay (an outage).
const (
	HeaderDelay    = "X-Workload-Delay"
	HeaderFailOnce = "X-Workload-Fail-Once"
	HeaderStatus   = "X-Workload-Status"
)

// Reply is the JSON body the http workload answers with.
type Reply struct {
	Pod       string      `json:"pod"`       // namespace/name
	Node      string      `json:"node"`      // node name
	PodIP     string      `json:"podIP"`     // the pod's own IP
	Remote    string      `json:"remote"`    // the peer address the server saw
	Local     string      `json:"local"`     // the local address the connection arrived on
	Method    string      `json:"method"`    // request method
	Path      string      `json:"path"`      // request URI
	Host      string      `json:"host"`      // Host header
	Proto     string      `json:"proto"`     // e.g. HTTP/1.1
	Header    http.Header `json:"header"`    // request headers
	BodyBytes int64       `json:"bodyBytes"` // size of the request body read
	// Mark is the accepted socket's SO_MARK. A connection the node agent
	// delivered transparently carries the agent's delivery mark (the pod's
	// net.ipv4.tcp_fwmark_accept copies it from the SYN); 0 otherwise. It
	// tells a delivery by the mesh from a direct connection, since both
	// show the client's own address.
	Mark uint32 `json:"mark,omitempty"`
}

// Names lists the workloads Main accepts.
var Names = []string{"http", "grpc", "tcp-echo", "udp-echo", "get", "requests", "grpc-check", "tcp", "udp", "sleep"}

// Main runs the workload named by args[0] until ctx ends (servers) or the
// work is done (clients), and returns the exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(stderr, "usage: nodemeshctl lab workload {%s} [flags]\n\n"+
			"The lab's built-in pod programs; each takes -h for its flags.\n", strings.Join(Names, "|"))
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	log := slog.New(slog.NewTextHandler(stderr, nil)).With("pod", os.Getenv(EnvPodNamespace)+"/"+os.Getenv(EnvPodName))
	var err error
	switch args[0] {
	case "http":
		err = runHTTP(ctx, log, args[1:])
	case "grpc":
		err = runGRPC(ctx, log, args[1:])
	case "grpc-check":
		err = runGRPCCheck(ctx, args[1:], stdout)
	case "tcp-echo":
		err = runTCPEcho(ctx, log, args[1:])
	case "udp-echo":
		err = runUDPEcho(ctx, log, args[1:])
	case "get":
		err = runGet(ctx, args[1:], stdout)
	case "requests":
		err = runRequests(ctx, args[1:], stdout)
	case "udp":
		err = runUDP(ctx, args[1:], stdout)
	case "tcp":
		err = runTCP(ctx, args[1:], stdout)
	case "sleep":
		<-ctx.Done()
	default:
		fmt.Fprintf(stderr, "unknown workload %q; want one of %s\n", args[0], strings.Join(Names, ", "))
		return 2
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // -h: the flags were printed
		}
		fmt.Fprintf(stderr, "workload %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

// podName is the pod the workload runs in, namespace/name.
func podName() string { return os.Getenv(EnvPodNamespace) + "/" + os.Getenv(EnvPodName) }

type portsFlag []int

func (p *portsFlag) String() string { return fmt.Sprint([]int(*p)) }
func (p *portsFlag) Set(s string) error {
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("%q is not a port number", f)
		}
		*p = append(*p, n)
	}
	return nil
}

// listen opens a non-MPTCP TCP listener on every address of network
// ("tcp4", or "tcp": one dual-stack socket where the namespace has IPv6, as
// most Go programs listen), so BPF sockmap programs of the mesh can see it.
func listen(ctx context.Context, network string, port int) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(ctx, network, ":"+strconv.Itoa(port))
	if err != nil {
		return nil, fmt.Errorf("listening on port %d: %w", port, err)
	}
	return ln, nil
}

// networkFlag adds --network to fs: the listeners' address family.
func networkFlag(fs *flag.FlagSet) *string {
	return fs.String("network", "tcp4", `listen on IPv4 only ("tcp4"), or dual-stack where the pod has IPv6 ("tcp")`)
}

func checkNetwork(network string) error {
	switch network {
	case "tcp4", "tcp", "tcp6":
		return nil
	}
	return fmt.Errorf("--network %q: want tcp4, tcp or tcp6", network)
}

// socketMark returns c's SO_MARK, or 0.
func socketMark(c net.Conn) uint32 {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	var mark int
	_ = rc.Control(func(fd uintptr) { mark, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
	return uint32(mark)
}

func runHTTP(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("http", flag.ContinueOnError)
	var ports portsFlag
	fs.Var(&ports, "port", "port to serve on (repeatable, or comma-separated)")
	network := networkFlag(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := checkNetwork(*network); err != nil {
		return err
	}
	if len(ports) == 0 {
		ports = portsFlag{8080}
	}
	self := Reply{
		Pod:   podName(),
		Node:  os.Getenv(EnvNodeName),
		PodIP: os.Getenv(EnvPodIP),
	}
	type localKey struct{}
	type markKey struct{}
	var failMu sync.Mutex
	failed := map[string]bool{} // X-Workload-Fail-Once keys already failed
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, io.LimitReader(r.Body, 64<<20))
		// Test hooks for L7 (timeouts, retries): a delay before answering,
		// and a 503 the first time this pod sees a key.
		if d, err := time.ParseDuration(r.Header.Get(HeaderDelay)); err == nil && d > 0 {
			select {
			case <-time.After(min(d, time.Minute)):
			case <-r.Context().Done():
				return
			}
		}
		if st, err := strconv.Atoi(r.Header.Get(HeaderStatus)); err == nil && st >= 100 && st <= 599 {
			w.Header().Set("X-Nodemesh-Pod", self.Pod)
			http.Error(w, "answering "+strconv.Itoa(st)+" as asked", st)
			return
		}
		if k := r.Header.Get(HeaderFailOnce); k != "" {
			failMu.Lock()
			first := !failed[k]
			failed[k] = true
			failMu.Unlock()
			if first {
				w.Header().Set("X-Nodemesh-Pod", self.Pod)
				http.Error(w, "failing once for "+k, http.StatusServiceUnavailable)
				return
			}
		}
		rep := self
		rep.Remote = r.RemoteAddr
		if la, ok := r.Context().Value(localKey{}).(net.Addr); ok {
			rep.Local = la.String()
		}
		rep.Mark, _ = r.Context().Value(markKey{}).(uint32)
		rep.Method, rep.Path, rep.Host, rep.Proto = r.Method, r.RequestURI, r.Host, r.Proto
		rep.Header = r.Header
		rep.BodyBytes = n
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Nodemesh-Pod", self.Pod)
		_ = json.NewEncoder(w).Encode(rep)
	})
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(context.WithValue(ctx, localKey{}, c.LocalAddr()), markKey{}, socketMark(c))
		},
	}
	var wg sync.WaitGroup
	errc := make(chan error, len(ports))
	for _, p := range ports {
		ln, err := listen(ctx, *network, p)
		if err != nil {
			_ = srv.Close()
			wg.Wait()
			return err
		}
		log.Info("serving http", "port", p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	wg.Wait()
	return err
}

func runTCPEcho(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("tcp-echo", flag.ContinueOnError)
	var ports portsFlag
	fs.Var(&ports, "port", "port to echo on (repeatable, or comma-separated)")
	network := networkFlag(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := checkNetwork(*network); err != nil {
		return err
	}
	if len(ports) == 0 {
		ports = portsFlag{9000}
	}
	var wg sync.WaitGroup
	var lns []net.Listener
	closeAll := func() {
		for _, ln := range lns {
			ln.Close()
		}
	}
	for _, p := range ports {
		ln, err := listen(ctx, *network, p)
		if err != nil {
			closeAll()
			wg.Wait()
			return err
		}
		lns = append(lns, ln)
		log.Info("serving tcp-echo", "port", p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var conns sync.WaitGroup
			defer conns.Wait()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				conns.Add(1)
				go func() {
					defer conns.Done()
					defer c.Close()
					stop := context.AfterFunc(ctx, func() { c.Close() })
					defer stop()
					_, _ = io.Copy(c, c)
				}()
			}
		}()
	}
	<-ctx.Done()
	closeAll()
	wg.Wait()
	return nil
}

func runGet(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("get", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 10*time.Second, "overall deadline")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: get [--timeout D] URL")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fs.Arg(0), nil)
	if err != nil {
		return fmt.Errorf("building request: %w", err)
	}
	// A fresh transport: no proxy from the environment, no pooling.
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", fs.Arg(0), err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(stdout, resp.Body); err != nil {
		return fmt.Errorf("reading the body of %s: %w", fs.Arg(0), err)
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("GET %s: status %s", fs.Arg(0), resp.Status)
	}
	return nil
}

// Result is one line the requests workload prints.
type Result struct {
	URL    string `json:"url"`
	Status int    `json:"status"`
	// Reused is true when the request went on a connection an earlier
	// request used: the connection survived that request's answer.
	Reused bool   `json:"reused"`
	Body   string `json:"body"`
	// Location is a redirect's target (with --no-follow).
	Location string `json:"location,omitempty"`
	Error    string `json:"error,omitempty"`
}

func runRequests(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("requests", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 20*time.Second, "overall deadline")
	parallel := fs.Int("parallel", 1, "requests in flight at once, each on its own connection")
	noFollow := fs.Bool("no-follow", false, "report redirects (status and Location) instead of following them")
	hdr := http.Header{}
	fs.Func("header", "a request header, name=value (repeatable)", func(s string) error {
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			return errors.New("want name=value")
		}
		hdr.Add(k, v)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("usage: requests [--timeout D] [--header name=value] [--parallel N] [--no-follow] URL [URL ...]")
	}
	if *parallel < 1 {
		return errors.New("--parallel must be at least 1")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	tr := &http.Transport{MaxConnsPerHost: *parallel, MaxIdleConnsPerHost: *parallel}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	if *noFollow {
		hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	}
	get := func(u string) (Result, error) {
		res := Result{URL: u}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return res, fmt.Errorf("building request: %w", err)
		}
		for k, vs := range hdr {
			req.Header[k] = vs
		}
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
			GotConn: func(i httptrace.GotConnInfo) { res.Reused = i.Reused },
		}))
		resp, err := hc.Do(req)
		if err != nil {
			res.Error = err.Error()
		} else {
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			res.Status, res.Body, res.Location = resp.StatusCode, string(b), resp.Header.Get("Location")
			if err != nil {
				res.Error = err.Error()
			}
		}
		return res, nil
	}
	enc := json.NewEncoder(stdout)
	if *parallel == 1 {
		for _, u := range fs.Args() {
			res, err := get(u)
			if err != nil {
				return err
			}
			if err := enc.Encode(res); err != nil {
				return err
			}
		}
		return nil
	}
	urls := fs.Args()
	results := make([]Result, len(urls))
	errs := make([]error, len(urls))
	next := make(chan int)
	var wg sync.WaitGroup
	for range *parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				results[i], errs[i] = get(urls[i])
			}
		}()
	}
	for i := range urls {
		next <- i
	}
	close(next)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, res := range results {
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	return nil
}

func runTCP(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("tcp", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 10*time.Second, "overall deadline")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return errors.New("usage: tcp [--timeout D] HOST:PORT MESSAGE")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp4", fs.Arg(0))
	if err != nil {
		return fmt.Errorf("connecting to %s: %w", fs.Arg(0), err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := io.WriteString(c, fs.Arg(1)); err != nil {
		return fmt.Errorf("sending to %s: %w", fs.Arg(0), err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	if _, err := io.Copy(stdout, c); err != nil {
		return fmt.Errorf("reading from %s: %w", fs.Arg(0), err)
	}
	return nil
}

func runUDPEcho(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("udp-echo", flag.ContinueOnError)
	port := fs.Int("port", 9001, "port to echo on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var lc net.ListenConfig
	pc, err := lc.ListenPacket(ctx, "udp4", ":"+strconv.Itoa(*port))
	if err != nil {
		return fmt.Errorf("listening on udp port %d: %w", *port, err)
	}
	log.Info("serving udp-echo", "port", *port)
	stop := context.AfterFunc(ctx, func() { pc.Close() })
	defer stop()
	buf := make([]byte, 64<<10)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("reading: %w", err)
		}
		if _, err := pc.WriteTo(buf[:n], addr); err != nil {
			log.Warn("udp-echo reply failed", "peer", addr.String(), "err", err)
		}
	}
}

func runUDP(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("udp", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the reply")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return errors.New("usage: udp [--timeout D] HOST:PORT MESSAGE")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp4", fs.Arg(0))
	if err != nil {
		return fmt.Errorf("dialing %s: %w", fs.Arg(0), err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(*timeout))
	if _, err := io.WriteString(c, fs.Arg(1)); err != nil {
		return fmt.Errorf("sending to %s: %w", fs.Arg(0), err)
	}
	buf := make([]byte, 64<<10)
	n, err := c.Read(buf)
	if err != nil {
		return fmt.Errorf("waiting for the reply from %s: %w", fs.Arg(0), err)
	}
	_, err = stdout.Write(buf[:n])
	return err
}
