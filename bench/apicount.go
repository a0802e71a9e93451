package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"k8s.io/client-go/rest"

	"github.com/nodemesh/nodemesh/lab/netns"
)

// apiCounter is a reverse proxy between one agent and the API server that
// counts the agent's requests and the bytes it receives. It listens on
// plain HTTP on the loopback of the agent's node (inside the node's network
// namespace) and forwards with the lab's admin credentials, so the agent
// behaves as with its usual kubeconfig while every request and every byte
// of every watch is seen. Byte counts are response bodies as the API
// server sent them (JSON, the agent's client-go default; large lists
// gzip-compressed, since the agent's requests accept gzip), without TLS or
// HTTP framing.
type apiCounter struct {
	srv  *http.Server
	ln   net.Listener
	addr string
	wg   sync.WaitGroup

	watches, reads, writes atomic.Int64
	bytes, watchBytes      atomic.Int64
}

// apiCount is a reading of an apiCounter; differences of two readings are
// the traffic of a window.
type apiCount struct {
	Watches    int64 `json:"watches"`    // watch requests (each opens a stream)
	Reads      int64 `json:"reads"`      // other GETs: lists and gets
	Writes     int64 `json:"writes"`     // everything else (the node mark's Lease, ...)
	Bytes      int64 `json:"bytes"`      // response bodies, all
	WatchBytes int64 `json:"watchBytes"` // response bodies of watches
}

func (c apiCount) minus(o apiCount) apiCount {
	return apiCount{Watches: c.Watches - o.Watches, Reads: c.Reads - o.Reads, Writes: c.Writes - o.Writes,
		Bytes: c.Bytes - o.Bytes, WatchBytes: c.WatchBytes - o.WatchBytes}
}

// Requests is every request of the reading.
func (c apiCount) Requests() int64 { return c.Watches + c.Reads + c.Writes }

// startAPICounter listens on 127.0.0.1 (any port) inside the network
// namespace at nsPath ("" = this process's) and forwards to the API server
// of rc.
func startAPICounter(nsPath string, rc *rest.Config) (*apiCounter, error) {
	target, err := url.Parse(rc.Host)
	if err != nil || target.Host == "" {
		return nil, fmt.Errorf("API server address %q: %w", rc.Host, err)
	}
	rt, err := rest.TransportFor(rc)
	if err != nil {
		return nil, fmt.Errorf("creating the API server transport: %w", err)
	}
	a := &apiCounter{}
	listen := func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		a.ln, err = lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
		return err
	}
	if nsPath == "" {
		err = listen()
	} else {
		err = netns.Do(nsPath, listen)
	}
	if err != nil {
		return nil, fmt.Errorf("listening in %s for the API counter: %w", nsPath, err)
	}
	a.addr = a.ln.Addr().String()
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = target.Host
		},
		Transport:     rt,
		FlushInterval: -1, // watches stream
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			// The agent hanging up (a watch it ends, a restart) is not
			// an error of the proxy.
			if !errors.Is(err, context.Canceled) {
				fmt.Fprintf(os.Stderr, "bench: API counter: %s %s: %v\n", r.Method, r.URL.Path, err)
			}
			w.WriteHeader(http.StatusBadGateway)
		},
		ModifyResponse: func(resp *http.Response) error {
			watch := isWatch(resp.Request)
			resp.Body = &countingBody{ReadCloser: resp.Body, total: &a.bytes, watch: watch, watchBytes: &a.watchBytes}
			return nil
		},
	}
	a.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case isWatch(r):
			a.watches.Add(1)
		case r.Method == http.MethodGet:
			a.reads.Add(1)
		default:
			a.writes.Add(1)
		}
		rp.ServeHTTP(w, r)
	})}
	a.wg.Go(func() {
		if err := a.srv.Serve(a.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintf(os.Stderr, "bench: API counter: %v\n", err)
		}
	})
	return a, nil
}

func isWatch(r *http.Request) bool {
	v := r.URL.Query().Get("watch")
	return r.Method == http.MethodGet && (v == "true" || v == "1") || strings.Contains(r.URL.Path, "/watch/")
}

// read returns the counts so far.
func (a *apiCounter) read() apiCount {
	return apiCount{Watches: a.watches.Load(), Reads: a.reads.Load(), Writes: a.writes.Load(),
		Bytes: a.bytes.Load(), WatchBytes: a.watchBytes.Load()}
}

// kubeconfig writes a kubeconfig for the counter to path.
func (a *apiCounter) kubeconfig(path string) error {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: counted
  cluster: {server: "http://%s"}
users:
- name: counted
  user: {}
contexts:
- name: counted
  context: {cluster: counted, user: counted}
current-context: counted
`, a.addr)
	if err := os.WriteFile(path, []byte(kc), 0o600); err != nil {
		return fmt.Errorf("writing the API counter's kubeconfig: %w", err)
	}
	return nil
}

// close stops the proxy and ends every stream through it.
func (a *apiCounter) close() {
	_ = a.srv.Close()
	a.wg.Wait()
}

type countingBody struct {
	io.ReadCloser
	total, watchBytes *atomic.Int64
	watch             bool
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.total.Add(int64(n))
	if b.watch {
		b.watchBytes.Add(int64(n))
	}
	return n, err
}
