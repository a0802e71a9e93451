package lab

// The lab has no kubelet, so nothing would answer the API server's
// pods/portforward (kubectl port-forward, nodemeshctl). The API proxy
// process therefore also stands in for the kubelets' streaming endpoint:
//
//   - the API server reaches kubelets through its "cluster" egress, HTTP
//     CONNECT over a Unix socket (apiserver.Config.KubeletEgress; on real
//     clusters konnectivity plays this part);
//   - for CONNECT <node>:10250 the proxy answers the kubelet's TLS API
//     itself, requiring the API server's kubelet client certificate (signed
//     by the lab CA), and serves /portForward/<namespace>/<pod> with the
//     kubelet's own port-forward code (k8s.io/kubelet's streaming package);
//   - each forwarded stream dials localhost:<port> inside the pod's network
//     namespace, or the node's for a pod the lab did not start (the mesh's
//     host-network agents and CA), as the container runtime does.

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/kubelet/pkg/cri/streaming/portforward"

	"github.com/nodemesh/nodemesh/lab/apiserver"
	"github.com/nodemesh/nodemesh/lab/netns"
)

// kubeletSocket is where the API server finds the kubelet stand-in; ""
// (no port-forward in this lab) when the state directory's path is too
// long for a Unix socket address.
func kubeletSocket(stateDir string) string {
	p := filepath.Join(stateDir, "kubelet.sock")
	if len(p) > 100 {
		return ""
	}
	return p
}

func (l *Lab) kubeletSocket() string { return kubeletSocket(l.st.Dir) }

// kubeletStandIn serves the kubelet API of every lab node on the API
// server's egress socket.
type kubeletStandIn struct {
	nodes     map[string]string // node name or IP -> node netns path
	podPrefix string            // pod netns path = podPrefix + namespace + "_" + name
	tls       *tls.Config
	conns     chan net.Conn // CONNECTed tunnels for the kubelet HTTPS server
}

func newKubeletStandIn(nodes map[string]string, podPrefix, clientCAFile string) (*kubeletStandIn, error) {
	caPEM, err := os.ReadFile(clientCAFile)
	if err != nil {
		return nil, fmt.Errorf("reading the kubelet client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no certificate in %s", clientCAFile)
	}
	cert, err := selfSigned("nodemesh-lab-kubelet")
	if err != nil {
		return nil, err
	}
	return &kubeletStandIn{nodes: nodes, podPrefix: podPrefix, conns: make(chan net.Conn),
		tls: &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool,
			MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}}, nil
}

// serve accepts CONNECT requests on ln until ctx ends.
func (k *kubeletStandIn) serve(ctx context.Context, ln net.Listener) {
	srv := &http.Server{Handler: k.handler(), ReadHeaderTimeout: 10 * time.Second, TLSConfig: k.tls,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.ServeTLS(&chanListener{ch: k.conns, done: ctx.Done(), addr: ln.Addr()}, "", "") })
	defer func() {
		_ = srv.Close()
		wg.Wait()
	}()
	var cwg sync.WaitGroup
	defer cwg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		cwg.Go(func() { k.connect(ctx, c) })
	}
}

// connect reads one CONNECT request and hands the tunnel to the kubelet
// server when it is for a node's kubelet port.
func (k *kubeletStandIn) connect(ctx context.Context, c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	req, err := http.ReadRequest(bufio.NewReader(c))
	if err != nil {
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	host, port, err := net.SplitHostPort(req.Host)
	if req.Method != http.MethodConnect || err != nil || port != strconv.Itoa(apiserver.KubeletPort) || k.nodes[host] == "" {
		fmt.Fprintf(c, "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n\r\nthe lab serves only CONNECT <node>:%d (the kubelet API), not %s %s\n", apiserver.KubeletPort, req.Method, req.Host)
		c.Close()
		return
	}
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		c.Close()
		return
	}
	// The API server speaks TLS first, so nothing is buffered past the
	// request; the connection carries the node in its address.
	select {
	case k.conns <- &nodeConn{Conn: c, node: host}:
	case <-ctx.Done():
		c.Close()
	}
}

func (k *kubeletStandIn) handler() http.Handler {
	mux := http.NewServeMux()
	pf := func(w http.ResponseWriter, r *http.Request) {
		ns, name := r.PathValue("namespace"), r.PathValue("pod")
		node := ""
		if nc, ok := r.Context().Value(nodeKey{}).(string); ok {
			node = nc
		}
		opts, err := portforward.NewV4Options(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		nsPath := k.podPrefix + ns + "_" + name
		if _, err := os.Stat(nsPath); err != nil {
			nsPath = k.nodes[node] // not a lab pod: host network
		}
		portforward.ServePortForward(w, r, netnsForwarder{path: nsPath}, ns+"/"+name, types.UID(""), opts,
			4*time.Hour, 30*time.Second, []string{portforward.ProtocolV1Name})
	}
	mux.HandleFunc("GET /portForward/{namespace}/{pod}", pf)
	mux.HandleFunc("POST /portForward/{namespace}/{pod}", pf)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The node this tunnel was opened for (see nodeConn).
		if a, ok := r.Context().Value(http.LocalAddrContextKey).(nodeAddr); ok {
			r = r.WithContext(context.WithValue(r.Context(), nodeKey{}, string(a)))
		}
		mux.ServeHTTP(w, r)
	})
}

type nodeKey struct{}

// netnsForwarder dials the forwarded port inside one network namespace.
type netnsForwarder struct{ path string }

func (f netnsForwarder) PortForward(ctx context.Context, _ string, _ types.UID, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	var c net.Conn
	err := netns.Do(f.path, func() error {
		d := net.Dialer{Timeout: 10 * time.Second}
		var err error
		c, err = d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
		if err != nil {
			c, err = d.DialContext(ctx, "tcp6", net.JoinHostPort("::1", strconv.Itoa(int(port))))
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("dialing localhost:%d in %s: %w", port, f.path, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(c, stream)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		close(done)
	}()
	_, err = io.Copy(stream, c)
	stream.Close()
	<-done
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("copying from localhost:%d: %w", port, err)
	}
	return nil
}

// nodeConn is a CONNECT tunnel; its local address names the node it was
// opened for, so the kubelet handler knows which node it serves.
type nodeConn struct {
	net.Conn
	node string
}

func (c *nodeConn) LocalAddr() net.Addr { return nodeAddr(c.node) }

type nodeAddr string

func (a nodeAddr) Network() string { return "kubelet" }
func (a nodeAddr) String() string  { return string(a) }

// chanListener is a net.Listener fed from a channel.
type chanListener struct {
	ch   chan net.Conn
	done <-chan struct{}
	addr net.Addr
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

// selfSigned makes the stand-in's serving certificate (the API server does
// not verify kubelet certificates without --kubelet-certificate-authority).
func selfSigned(cn string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating the kubelet serving key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("signing the kubelet serving certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
