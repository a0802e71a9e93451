package lab

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nodemesh/nodemesh/lab/netns"
)

// The API server listens on the root namespace's loopback, which no node
// namespace can reach. The API proxy - a small process of the lab - opens
// a listener on 127.0.0.1:<same port> inside every node's namespace and
// forwards each connection to the API server, so the one kubeconfig works
// for agents running in a node exactly as on the host. TLS passes through
// untouched.

type stringsFlag []string

func (s *stringsFlag) String() string     { return strings.Join(*s, ",") }
func (s *stringsFlag) Set(v string) error { *s = append(*s, v); return nil }

func apiProxyMain(args []string) int {
	fs := flag.NewFlagSet("apiproxy", flag.ContinueOnError)
	target := fs.String("target", "", "host:port of the API server")
	var nss, nodes stringsFlag
	fs.Var(&nss, "netns", "network namespace path to listen in (repeatable)")
	kubeletSock := fs.String("kubelet-socket", "", "serve the kubelet stand-in on this Unix socket (the API server's cluster egress)")
	kubeletCA := fs.String("kubelet-client-ca", "", "CA of the API server's kubelet client certificate")
	podPrefix := fs.String("pod-netns-prefix", "", "path prefix of pod network namespaces (then NAMESPACE_NAME)")
	fs.Var(&nodes, "node", "NAME=IP=NETNS of a node, for the kubelet stand-in (repeatable)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	_, port, err := net.SplitHostPort(*target)
	if err != nil || len(nss) == 0 {
		fmt.Fprintln(os.Stderr, "usage: lab apiproxy --target HOST:PORT --netns PATH...")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var lns []net.Listener
	for _, p := range nss {
		var ln net.Listener
		err := netns.Do(p, func() error {
			var lc net.ListenConfig
			lc.SetMultipathTCP(false)
			var err error
			ln, err = lc.Listen(ctx, "tcp4", "127.0.0.1:"+port)
			return err
		})
		if err != nil {
			fmt.Fprintf(os.Stderr, "apiproxy: listening in %s: %v\n", p, err)
			return 1
		}
		lns = append(lns, ln)
	}
	var kubelet *kubeletStandIn
	var kubeletLn net.Listener
	if *kubeletSock != "" {
		byName := map[string]string{}
		for _, n := range nodes {
			parts := strings.SplitN(n, "=", 3)
			if len(parts) != 3 {
				fmt.Fprintf(os.Stderr, "apiproxy: --node %q: want NAME=IP=NETNS\n", n)
				return 2
			}
			byName[parts[0]], byName[parts[1]] = parts[2], parts[2]
		}
		var err error
		if kubelet, err = newKubeletStandIn(byName, *podPrefix, *kubeletCA); err != nil {
			fmt.Fprintf(os.Stderr, "apiproxy: %v\n", err)
			return 1
		}
		_ = os.Remove(*kubeletSock)
		if kubeletLn, err = net.Listen("unix", *kubeletSock); err != nil {
			fmt.Fprintf(os.Stderr, "apiproxy: listening on %s: %v\n", *kubeletSock, err)
			return 1
		}
		defer os.Remove(*kubeletSock)
	}
	// Tell the lab we are ready (fd 3), then serve.
	if ready := os.NewFile(3, "ready"); ready != nil {
		_, _ = ready.WriteString("ready\n")
		ready.Close()
	}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveProxy(ctx, ln, *target)
		}()
	}
	if kubelet != nil {
		wg.Go(func() { kubelet.serve(ctx, kubeletLn) })
	}
	<-ctx.Done()
	for _, ln := range lns {
		ln.Close()
	}
	if kubeletLn != nil {
		kubeletLn.Close()
	}
	wg.Wait()
	return 0
}

func serveProxy(ctx context.Context, ln net.Listener, target string) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			d := net.Dialer{Timeout: 10 * time.Second}
			u, err := d.DialContext(ctx, "tcp4", target)
			if err != nil {
				fmt.Fprintf(os.Stderr, "apiproxy: dialing %s: %v\n", target, err)
				return
			}
			defer u.Close()
			stop := context.AfterFunc(ctx, func() { c.Close(); u.Close() })
			defer stop()
			done := make(chan struct{})
			go func() {
				_, _ = io.Copy(u, c)
				if tc, ok := u.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
				close(done)
			}()
			_, _ = io.Copy(c, u)
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
			<-done
		}()
	}
}

// startAPIProxy starts the proxy (detached, in the lab's control cgroup)
// and waits until it listens in every node.
func (l *Lab) startAPIProxy(ctx context.Context) error {
	u, err := url.Parse(l.Server.URL)
	if err != nil {
		return fmt.Errorf("parsing the API server URL: %w", err)
	}
	argv := []string{"nodemeshctl", "lab", "apiproxy", "--target", u.Host}
	if sock := l.kubeletSocket(); sock != "" {
		argv = append(argv, "--kubelet-socket", sock, "--kubelet-client-ca", l.Server.CAFile,
			"--pod-netns-prefix", netnsPath(l.names.prefix()+"-pod-"))
	}
	for _, n := range sortedNodes(l.st.Nodes) {
		argv = append(argv, "--netns", n.Netns, "--node", n.Name+"="+n.IP+"="+n.Netns)
	}
	cmd, err := l.command(context.Background(), argv)
	if err != nil {
		return fmt.Errorf("starting the API proxy: %w", err)
	}
	cmd.Env = append(cmd.Env, baseEnv()...)
	logPath := filepath.Join(l.st.Dir, "logs", "apiproxy.log")
	logf, err := openLog(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	pr, pw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("starting the API proxy: %w", err)
	}
	defer pr.Close()
	cmd.ExtraFiles = []*os.File{pw}
	err = spawn(cmd, "", filepath.Join(l.st.CgroupRoot, "control"), true)
	pw.Close()
	if err != nil {
		return fmt.Errorf("starting the API proxy: %w", err)
	}
	l.track(cmd)
	l.st.APIServer.ProxyPid = cmd.Process.Pid
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(pr).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		if strings.TrimSpace(s) != "ready" {
			return errors.New("the API proxy failed to start: " + logTail(logPath, 1000))
		}
	case <-ctx.Done():
		pr.Close()
		return fmt.Errorf("waiting for the API proxy: %w", ctx.Err())
	case <-time.After(30 * time.Second):
		pr.Close()
		return errors.New("the API proxy did not start within 30s: " + logTail(logPath, 1000))
	}
	return nil
}
