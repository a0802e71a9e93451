package proxy_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// lineL7 is a stand-in L7 layer speaking a line protocol: outbound, each
// line the client sends is a "request" sent to an endpoint picked for it;
// inbound, each line goes to the application and the answer comes back
// prefixed, so a test sees both ends of the seam.
type lineL7 struct {
	outbound, inbound atomic.Int32
	claim             func(w *proxy.Workload, port uint16) bool
}

func (l *lineL7) Outbound(o *proxy.L7Outbound) {
	l.outbound.Add(1)
	defer o.Conn.Close()
	br := bufio.NewReader(o.Conn)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		ep, release := o.Pick(o.Dest.Endpoints)
		up, err := o.Dial(context.Background(), o.Flow.Service, ep)
		if err != nil {
			io.WriteString(o.Conn, "ERR "+err.Error()+"\n")
			release()
			continue
		}
		io.WriteString(up, line)
		answer, _ := bufio.NewReader(up).ReadString('\n')
		up.Close()
		release()
		io.WriteString(o.Conn, answer)
	}
}

func (l *lineL7) InboundPort(w *proxy.Workload, port uint16) (l7.Protocol, bool) {
	return l7.HTTP1, l.claim(w, port)
}

func (l *lineL7) Inbound(i *proxy.L7Inbound) {
	l.inbound.Add(1)
	if !i.Flow.L7 {
		panic("inbound L7 flow without Flow.L7")
	}
	br := bufio.NewReader(i.Conn)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		app, err := i.DialApp(context.Background())
		if err != nil {
			return
		}
		io.WriteString(app, line)
		app.(*net.TCPConn).CloseWrite()
		got, _ := io.ReadAll(app)
		app.Close()
		io.WriteString(i.Conn, "via "+i.Flow.Workload.Name+": "+string(got))
	}
}

func TestL7Seam(t *testing.T) {
	layer := &lineL7{}
	f := newFixture(t, fixtureOpts{l7: layer})
	var claimed atomic.Bool
	layer.claim = func(w *proxy.Workload, port uint16) bool {
		return claimed.Load() && (port == f.b1.app.Port() || port == f.b2.app.Port())
	}

	// A Service that did not opt in never reaches the L7 layer.
	c := f.dial(svcVIP)
	io.WriteString(c, "plain\n")
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "plain\n" {
		t.Fatalf("L4 echo: %q, %v", got, err)
	}
	if n, m := layer.outbound.Load(), layer.inbound.Load(); n != 0 || m != 0 {
		t.Fatalf("an L4 Service reached the L7 layer (%d outbound, %d inbound)", n, m)
	}
	claimed.Store(true)

	// Opted in: every line is a request through both L7 ends.
	c = f.dial(svcL7VIP)
	br := bufio.NewReader(c)
	for i := range 6 {
		io.WriteString(c, "req\n")
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if line != "via b-pod: req\n" {
			t.Fatalf("request %d answered %q", i, line)
		}
	}
	if layer.outbound.Load() != 1 || layer.inbound.Load() != 6 {
		t.Fatalf("outbound %d, inbound %d; want 1 and 6", layer.outbound.Load(), layer.inbound.Load())
	}
	// The downstream connection is listed (Flow.L7) while open.
	l7conns := 0
	for _, ci := range f.node1.Connections() {
		if ci.Flow.L7 && ci.Flow.Service == "default/b" {
			l7conns++
		}
	}
	if l7conns != 1 {
		t.Fatalf("node 1 lists %d L7 connections, want 1", l7conns)
	}

	// Egress denied per request: the L7 layer gets an error, the
	// connection stays.
	f.setPolicy(proxy.PolicyFunc(func(_ context.Context, fl *proxy.Flow) proxy.Decision {
		return proxy.Decision{Allow: fl.Direction == proxy.Inbound, Reason: "test denies egress"}
	}))
	io.WriteString(c, "req\n")
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "ERR ") || !strings.Contains(line, "denied by policy") {
		t.Fatalf("denied request: %q, %v", line, err)
	}
	c.Close()
	// Pick's release runs per request; the L4 connection's when it ends.
	waitfor.True(t, 20*time.Second, "the balancer to count nothing in flight", func() bool { return f.node1.InflightEndpoints() == 0 })
	waitfor.True(t, 20*time.Second, "connections to be untracked", func() bool {
		return len(f.node1.Connections())+len(f.node2.Connections()) == 0
	})
}
