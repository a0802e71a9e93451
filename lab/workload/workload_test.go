package workload

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T, network string) int {
	t.Helper()
	if network == "udp" {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		return pc.LocalAddr().(*net.UDPAddr).Port
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// serve runs a server workload in this process until the test ends.
func serve(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		Main(ctx, args, io.Discard, io.Discard)
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
}

func run(t *testing.T, args ...string) (string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(context.Background(), args, &out, &errb)
	if code != 0 {
		return errb.String(), code
	}
	return out.String(), 0
}

func waitTCP(t *testing.T, port int) {
	t.Helper()
	for i := 0; i < 500; i++ {
		c, err := net.Dial("tcp4", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %d", port)
}

func TestHTTPReportsWhoAndWhat(t *testing.T) {
	t.Setenv(EnvPodName, "web-1")
	t.Setenv(EnvPodNamespace, "shop")
	t.Setenv(EnvNodeName, "node-1")
	t.Setenv(EnvPodIP, "10.244.1.2")
	p1, p2 := freePort(t, "tcp"), freePort(t, "tcp")
	serve(t, "http", "--port", strconv.Itoa(p1)+","+strconv.Itoa(p2))
	waitTCP(t, p1)
	waitTCP(t, p2)
	for _, p := range []int{p1, p2} {
		out, code := run(t, "get", "http://127.0.0.1:"+strconv.Itoa(p)+"/a/b?c=d")
		if code != 0 {
			t.Fatalf("get: %s", out)
		}
		var r Reply
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("%q: %v", out, err)
		}
		if r.Pod != "shop/web-1" || r.Node != "node-1" || r.PodIP != "10.244.1.2" || r.Path != "/a/b?c=d" || r.Method != "GET" {
			t.Errorf("reply %+v", r)
		}
		if !strings.HasPrefix(r.Remote, "127.0.0.1:") || r.Local != "127.0.0.1:"+strconv.Itoa(p) {
			t.Errorf("remote %s local %s", r.Remote, r.Local)
		}
	}
}

func TestTCPAndUDPEcho(t *testing.T) {
	tp, up := freePort(t, "tcp"), freePort(t, "udp")
	serve(t, "tcp-echo", "--port", strconv.Itoa(tp))
	serve(t, "udp-echo", "--port", strconv.Itoa(up))
	waitTCP(t, tp)
	if out, code := run(t, "tcp", "127.0.0.1:"+strconv.Itoa(tp), "hello tcp"); code != 0 || out != "hello tcp" {
		t.Errorf("tcp: %q %d", out, code)
	}
	var out string
	var code int
	for i := 0; i < 50; i++ { // the server may not be bound yet
		if out, code = run(t, "udp", "--timeout", "200ms", "127.0.0.1:"+strconv.Itoa(up), "hello udp"); code == 0 {
			break
		}
	}
	if code != 0 || out != "hello udp" {
		t.Errorf("udp: %q %d", out, code)
	}
}

func TestClientErrors(t *testing.T) {
	dead := strconv.Itoa(freePort(t, "tcp"))
	cases := [][]string{
		{"get", "--timeout", "2s", "http://127.0.0.1:" + dead + "/"},
		{"get"},
		{"get", "::not a url"},
		{"tcp", "127.0.0.1:" + dead, "x"},
		{"tcp", "only-one-arg"},
		{"nosuch"},
		{},
		{"http", "--port", "0"},
		{"http", "--port", "http"},
	}
	for _, args := range cases {
		if out, code := run(t, args...); code == 0 {
			t.Errorf("%v succeeded: %q", args, out)
		}
	}
}

func TestGetFailsOnHTTPError(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 4096)
		_, _ = c.Read(buf)
		_, _ = io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown")
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out bytes.Buffer
	err = runGet(ctx, []string{"http://" + ln.Addr().String() + "/"}, &out)
	if err == nil || !strings.Contains(err.Error(), "503") || out.String() != "down" {
		t.Errorf("err %v, body %q", err, out.String())
	}
}

// requests --parallel keeps URL order in its output; X-Workload-Status
// answers every request with the status asked for.
func TestRequestsParallelAndStatus(t *testing.T) {
	p := freePort(t, "tcp")
	serve(t, "http", "--port", strconv.Itoa(p))
	waitTCP(t, p)
	var urls []string
	for i := range 12 {
		urls = append(urls, "http://127.0.0.1:"+strconv.Itoa(p)+"/"+strconv.Itoa(i))
	}
	out, code := run(t, append([]string{"requests", "--parallel", "4", "--header", HeaderStatus + "=503"}, urls...)...)
	if code != 0 {
		t.Fatalf("requests: %s", out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(urls) {
		t.Fatalf("%d lines for %d URLs: %s", len(lines), len(urls), out)
	}
	for i, line := range lines {
		var r Result
		if err := json.Unmarshal([]byte(line), &r); err != nil || r.URL != urls[i] || r.Status != 503 {
			t.Errorf("line %d: %q (%v), want %s answered 503", i, line, err, urls[i])
		}
	}
	if out, code := run(t, "requests", "--parallel", "0", urls[0]); code == 0 {
		t.Errorf("--parallel 0 accepted: %s", out)
	}
}

// grpc-check calls the grpc workload's health service over h2c and reports
// the answering pod.
func TestGRPCHealth(t *testing.T) {
	t.Setenv(EnvPodName, "grpc-1")
	t.Setenv(EnvPodNamespace, "shop")
	p := freePort(t, "tcp")
	serve(t, "grpc", "--port", strconv.Itoa(p))
	waitTCP(t, p)
	out, code := run(t, "grpc-check", "--n", "2", "--header", "x-a=b", "127.0.0.1:"+strconv.Itoa(p))
	if code != 0 {
		t.Fatalf("grpc-check: %s", out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %s", len(lines), out)
	}
	for _, line := range lines {
		var r GRPCResult
		if err := json.Unmarshal([]byte(line), &r); err != nil || r.Code != "OK" || r.Status != "SERVING" || r.Pod != "shop/grpc-1" {
			t.Errorf("%q (%v), want OK SERVING from shop/grpc-1", line, err)
		}
	}
	out, code = run(t, "grpc-check", "--service", "nope", "127.0.0.1:"+strconv.Itoa(p))
	var r GRPCResult
	if code != 0 || json.Unmarshal([]byte(out), &r) != nil || r.Code != "NotFound" {
		t.Errorf("unknown service: %q, want NotFound", out)
	}
}
