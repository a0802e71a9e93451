package mesh_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
)

// TestLabMeshDemo brings up the mesh demo's lab, runs every mesh step of
// the demo over it (which start the real CA and agents with Start, check
// traffic, identities, the underlay capture, PERMISSIVE, policy and live
// explain, and Stop), and checks what Start reported and that Stop left
// no mesh process running.
func TestLabMeshDemo(t *testing.T) {
	sp, err := demo.MeshSpec()
	if err != nil {
		t.Fatal(err)
	}
	l := labtest.Up(t, sp)
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()

	// Start refuses to run without binaries.
	if _, err := mesh.Start(ctx, l, mesh.Options{}); err == nil {
		t.Fatal("Start without binaries succeeded")
	}

	var out bytes.Buffer
	env := &demo.Env{Lab: l, Out: &out}
	steps := demo.MeshSteps(demo.MeshOptions{AgentBinary: agentBin, CABinary: caBin})
	defer func() { t.Logf("demo output:\n%s", out.String()) }()
	for i, s := range steps[:len(steps)-1] {
		sctx, scancel := context.WithTimeout(ctx, 2*time.Minute)
		err := s.Run(sctx, env)
		scancel()
		if err != nil {
			t.Fatalf("step %d (%s): %v", i+1, s.Name, err)
		}
	}
	for _, want := range []string{
		"client     enabled           yes",
		"outside    -                 no",
		"node-2  shop/web-2       verified",
		"source agent (node-1) access log: ",
		"destination agent (node-2) access log: ",
		"spiffe://cluster.local/ns/client/sa/client => spiffe://cluster.local/ns/shop/sa/web",
		"0 frames contain",
		"GET /admin                   403  RBAC: access denied (same connection)",
		"GET /public//hello/./again   200  answered by shop/web-",
		"which saw the path /public/hello/again (same connection)",
		"DENY  client/client-1",
		"NetworkPolicy shop/web-from-shop-only",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	for _, f := range []string{"underlay-mtls.pcap", "underlay-plaintext.pcap"} {
		if fi, err := os.Stat(filepath.Join(l.StateDir(), "mesh", f)); err != nil || fi.Size() <= 24 {
			t.Errorf("capture %s: %v (size %v)", f, err, fi)
		}
	}

	// A second mesh cannot start beside the running one (its process names
	// are taken); the failed Start must not stop the running mesh.
	procs := func() map[string]int {
		m := map[string]int{}
		for _, p := range l.Processes() {
			if (p.Name == mesh.AgentProcess || p.Name == mesh.CAProcess) && l.Running(p) {
				m[p.Node+"/"+p.Name] = p.Pid
			}
		}
		return m
	}
	running := procs()
	if len(running) != 3 {
		t.Fatalf("want a CA and two agents running, have %v", running)
	}
	if _, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin, Wait: 10 * time.Second}); err == nil {
		t.Fatal("a second mesh started in the same lab")
	}
	if now := procs(); !reflect.DeepEqual(now, running) {
		t.Fatalf("a failed Start changed the running mesh: %v, before %v", now, running)
	}

	last := steps[len(steps)-1]
	if err := last.Run(ctx, env); err != nil {
		t.Fatalf("%s: %v", last.Name, err)
	}
	if left := procs(); len(left) != 0 {
		t.Fatalf("mesh processes still running after Stop: %v", left)
	}
}
