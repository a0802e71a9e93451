package l7

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
)

func echoPath(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/deny" {
		http.Error(w, "denied", http.StatusForbidden)
		return
	}
	fmt.Fprintf(w, "%s %s %s", r.Proto, r.Method, r.URL.Path)
}

func TestServeConnHTTP1(t *testing.T) {
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeConn(context.Background(), server, HTTP1, http.HandlerFunc(echoPath), 0)
	}()
	br := bufio.NewReader(client)
	for _, path := range []string{"/a", "/deny", "/b"} {
		if _, err := io.WriteString(client, "GET "+path+" HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if path == "/deny" {
			if resp.StatusCode != http.StatusForbidden {
				t.Fatalf("/deny: %d", resp.StatusCode)
			}
			continue
		}
		if string(body) != "HTTP/1.1 GET "+path {
			t.Fatalf("%s: %q", path, body)
		}
	}
	client.Close()
	<-done // ServeConn returns when the client closes
}

func TestServeConnH2C(t *testing.T) {
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeConn(context.Background(), server, H2C, http.HandlerFunc(echoPath), 0)
	}()
	tr := &http.Transport{Protocols: new(http.Protocols), DialContext: func(context.Context, string, string) (net.Conn, error) {
		return client, nil
	}}
	tr.Protocols.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: tr}
	for _, path := range []string{"/a", "/deny", "/b"} {
		resp, err := hc.Get("http://x" + path)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if path == "/deny" != (resp.StatusCode == http.StatusForbidden) || (path != "/deny" && !strings.HasPrefix(string(body), "HTTP/2.0 GET "+path)) {
			t.Fatalf("%s: %d %q", path, resp.StatusCode, body)
		}
	}
	tr.CloseIdleConnections()
	client.Close()
	<-done
}

func TestServeConnContextEnds(t *testing.T) {
	for _, p := range []Protocol{HTTP1, H2C} {
		client, server := net.Pipe()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			ServeConn(ctx, server, p, http.HandlerFunc(echoPath), 0)
		}()
		cancel()
		<-done
		// The server side is closed: the client reads EOF or a closed pipe.
		if _, err := client.Read(make([]byte, 1)); err == nil {
			t.Errorf("%v: connection still open after ctx ended", p)
		}
		client.Close()
	}
}
