package redirect

import (
	"context"
	"testing"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

func TestPrivSmoke(t *testing.T) {
	privtest.Root(t)
	tp := newTopo(t)
	a, b := tp.pod("a"), tp.pod("b")
	c, err := Load(context.Background(), tp.config())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t.Log(c.Accel())
	srv := serveLines(t, listenIn(t, b, "tcp", ":8080"), "SERVER")
	ep, err := c.Enroll(context.Background(), Pod{Name: "a", Netns: a.netns, Cgroup: a.cgroup, IPs: a.ips()})
	if err != nil {
		t.Fatal(err)
	}
	agentServe(t, c, ep)
	r := appDial(t, a, "tcp", "10.211.0.3:8080", "hi")
	t.Logf("%+v", r)
	r = appDial(t, a, "tcp", "[fd00:211::3]:8080", "hi6")
	t.Logf("%+v", r)
	if err := ep.SelfCheck(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Log(srv.count())
	st, _ := c.Stats()
	t.Log(st)
}
