package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// TestLabAdversarialCADownPastTTL takes the CA away from real agents for
// longer than the SVIDs live (issue 14: "the CA down past the TTL"). The
// agents keep their cached SVIDs until expiry; after it, new tunnels fail
// closed (no plaintext fallback, nothing on the underlay), and so do new
// streams on a tunnel pooled before expiry (its connection drains at the
// first NotAfter of its handshake's certificates); when the CA returns,
// they recover by themselves.
func TestLabAdversarialCADownPastTTL(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	setMode(t, ctx, l, "shop", state.ModeEnabled)
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin, SVIDTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Stop(context.Background()); err != nil {
			t.Errorf("stopping the mesh: %v", err)
		}
	})
	t.Cleanup(func() {
		for _, n := range []string{"node-1", "node-2"} {
			dumpLog(t, m.Agents[n].Log)
		}
	})
	node1 := mustNode(t, l, "node-1")
	web1, web2, echo := mustLabPod(t, l, "shop/web-1"), mustLabPod(t, l, "shop/web-2"), mustLabPod(t, l, "shop/echo-1")
	r, out, err := demo.Get(ctx, l, web1.Key(), "http://"+web2.IP+":8080/before")
	if err != nil {
		t.Fatalf("web-1 to web-2 before the outage: %v %s", err, out)
	}
	if err := deliveredFrom(r, web2, web1.IP); err != nil {
		t.Fatal(err)
	}
	// expiries returns the last NotAfter among the SVIDs both agents
	// hold, and the first NotAfter of shop/web's SVIDs (web-1's on
	// node-1, web-2's on node-2): when the tunnel between them expires.
	expiries := func() (last, web time.Time) {
		for _, n := range []string{"node-1", "node-2"} {
			nd := mustNode(t, l, n)
			_, body, err := httpGet(nodeClient(nd), "http://127.0.0.1:15000/config_dump/certificates")
			if err != nil {
				t.Fatal(err)
			}
			var certs []certDump
			if err := json.Unmarshal([]byte(body), &certs); err != nil {
				t.Fatalf("%s certificates: %v: %s", n, err, body)
			}
			for _, c := range certs {
				if c.NotAfter.After(last) {
					last = c.NotAfter
				}
				if c.SPIFFEID == "spiffe://cluster.local/ns/shop/sa/web" && (web.IsZero() || c.NotAfter.Before(web)) {
					web = c.NotAfter
				}
			}
		}
		return last, web
	}
	echoTCP := func(msg string) error {
		out, err := l.Exec(ctx, web1.Key(), []string{"nodemeshctl", "lab", "workload", "tcp", "--timeout", "5s", echo.IP + ":9000", msg})
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		if !strings.Contains(string(out), msg) {
			return fmt.Errorf("echo answered %q", out)
		}
		return nil
	}

	sn := sniff(t, node1.Link)
	if err := m.StopCA(ctx); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	expiry, webExpiry := expiries()
	t.Logf("CA stopped; the last SVID the agents hold expires in %s, web's first in %s", time.Until(expiry).Round(time.Second), time.Until(webExpiry).Round(time.Second))
	if webExpiry.IsZero() {
		t.Fatal("neither agent holds an SVID for shop/web")
	}
	if time.Until(expiry) > 2*time.Minute {
		t.Fatalf("SVIDs expire at %s, more than the 1m TTL from now", expiry)
	}
	// Until expiry the cached SVIDs keep serving new tunnels (web-2 to
	// web-1: a tunnel neither agent had; web-1 to echo-1 below must be
	// the first tunnel to echo-1, since an established tunnel is not
	// re-verified).
	if r, out, err := demo.Get(ctx, l, web2.Key(), "http://"+web1.IP+":8080/CACHED-SVID"); err != nil {
		if time.Now().Before(expiry.Add(-5 * time.Second)) {
			t.Fatalf("web-2 to web-1 with the CA down but SVIDs valid: %v %s", err, out)
		}
	} else if err := deliveredFrom(r, web1, web2.IP); err != nil {
		t.Fatal(err)
	}
	// web-1 -> web-2 again shortly before expiry, so that node-1's pool
	// holds that tunnel (idle for seconds, not the 2 min that would close
	// it) when the SVIDs expire.
	if d := time.Until(webExpiry) - 10*time.Second; d > 0 {
		time.Sleep(d)
	}
	// (With SVIDs renewed at half life, the CA stops at least 30 s before
	// web's SVIDs expire; the steps above take a few seconds.)
	if time.Until(webExpiry) < 3*time.Second {
		t.Fatalf("web's SVIDs expire in %s: no time left to pool a tunnel before expiry", time.Until(webExpiry))
	}
	if _, out, err := demo.Get(ctx, l, web1.Key(), "http://"+web2.IP+":8080/POOLED"); err != nil {
		t.Fatalf("web-1 to web-2 shortly before web's SVIDs expire: %v %s", err, out)
	}
	n1Before, n2Before := tunnelMetrics(t, node1), tunnelMetrics(t, mustNode(t, l, "node-2"))
	pooled, err := readUsage(ctx, m, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node-1 %s before web's SVIDs expire: %s; expiry drains node-1 %v, node-2 %v", time.Until(webExpiry).Round(time.Second), pooled, n1Before, n2Before)
	if pooled.PoolConns == 0 {
		t.Fatalf("node-1's pool holds no tunnel before expiry: the pooled-tunnel check below proves nothing")
	}
	time.Sleep(time.Until(expiry) + 2*time.Second)
	marker := fmt.Sprintf("NODEMESH-EXPIRED-%d", time.Now().UnixNano())
	if err := echoTCP(marker); err == nil {
		t.Fatalf("web-1 to echo-1 after every SVID expired (CA down %s): it worked", time.Since(stopped).Round(time.Second))
	} else {
		t.Logf("after expiry, web-1 to echo-1 fails closed: %v", err)
	}
	// The tunnel web-1 -> web-2 pooled before expiry takes no new stream
	// (TLS verified its certificates only at the handshake; before the
	// fix it carried new streams until idle for 2 min). Both ends watch
	// the same two certificates, so both drain it at the same instant;
	// when one end's GOAWAY closes the idle connection first, only that
	// end counts it.
	if r, out, err := demo.Get(ctx, l, web1.Key(), "http://"+web2.IP+":8080/"+marker); err == nil {
		t.Errorf("after expiry, web-1 to web-2 still works (%+v %s): a tunnel pooled before expiry carried a new stream", r, out)
	} else {
		t.Logf("after expiry, web-1 to web-2 fails closed: %v", err)
	}
	n1After, n2After := tunnelMetrics(t, node1), tunnelMetrics(t, mustNode(t, l, "node-2"))
	t.Logf("expiry drains after expiry: node-1 %v, node-2 %v", n1After, n2After)
	if n1After["expiry_drains_client"]+n2After["expiry_drains_server"] <= n1Before["expiry_drains_client"]+n2Before["expiry_drains_server"] {
		t.Errorf("neither node-1's pool nor node-2's tunnel server drained the web-1 -> web-2 connection at expiry (node-1 %v -> %v, node-2 %v -> %v)",
			n1Before, n1After, n2Before, n2After)
	}
	for _, n := range []string{"node-1", "node-2"} {
		if err := m.Ready(ctx, n); err == nil {
			t.Logf("%s reports ready with expired SVIDs", n)
		} else {
			t.Logf("%s not ready with expired SVIDs: %v", n, err)
		}
	}

	if err := m.StartCA(ctx); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	waitfor.NoError(t, 2*time.Minute, "web-1 to echo-1 once the CA is back", func() error { return echoTCP("CA-BACK") })
	t.Logf("recovered %s after the CA came back", time.Since(back).Round(100*time.Millisecond))
	frames := sn.stop()
	if !tcpPortSeen(frames, 15008) {
		t.Fatalf("no HBONE seen on %s in %d frames: the sniffer proves nothing", node1.Link, len(frames))
	}
	for _, s := range []string{marker, "CA-BACK"} {
		if contains(frames, []byte(s)) {
			t.Fatalf("%q crossed the underlay in plaintext", s)
		}
	}
}
