package dataplane_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/dataplane"
	"github.com/nodemesh/nodemesh/agent/dataplane/dataplanetest"
	"github.com/nodemesh/nodemesh/agent/hbone/hbonetest"
	"github.com/nodemesh/nodemesh/agent/internal/leaktest"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
	"github.com/nodemesh/nodemesh/agent/workloads"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

func TestMain(m *testing.M) { leaktest.Main(m) }

type fixture struct {
	t       *testing.T
	ca      *hbonetest.CA
	capture *dataplanetest.Capture
	svids   *dataplanetest.SVIDs
	dp      *dataplane.Dataplane
	echo    netip.AddrPort
	resolve atomic.Pointer[proxy.ResolverFunc]
	// nodePorts answers Config.NodeProbePorts for every pod (nil: none).
	nodePorts atomic.Pointer[[]uint16]

	mu     sync.Mutex
	status map[string]telemetry.CaptureStatus
}

var allowAll = proxy.PolicyFunc(func(context.Context, *proxy.Flow) proxy.Decision {
	return proxy.Decision{Allow: true, Reason: "test allows all"}
})

// newFixture builds a data plane over the fakes; obs, if given, observes
// its connections.
func newFixture(t *testing.T, obs ...proxy.Observer) *fixture {
	t.Helper()
	var observer proxy.Observer
	if len(obs) > 0 {
		observer = obs[0]
	}
	ca, err := hbonetest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, ca: ca, capture: &dataplanetest.Capture{}, svids: dataplanetest.NewSVIDs(ca), status: map[string]telemetry.CaptureStatus{}}
	f.echo = echoServer(t, "127.0.0.1")
	passthrough := proxy.ResolverFunc(func(_ *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
		return proxy.Destination{Endpoints: []proxy.Endpoint{{Addr: dst}}}, nil
	})
	f.resolve.Store(&passthrough)
	f.dp, err = dataplane.New(dataplane.Config{
		Capture: f.capture,
		SVIDs:   f.svids,
		Resolver: proxy.ResolverFunc(func(w *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
			return (*f.resolve.Load())(w, dst)
		}),
		Policy:   allowAll,
		Observer: observer,
		Status: func(ns, name string, s telemetry.CaptureStatus) {
			f.mu.Lock()
			defer f.mu.Unlock()
			if s == "" {
				delete(f.status, ns+"/"+name)
			} else {
				f.status[ns+"/"+name] = s
			}
		},
		SelfCheckBackoff: time.Millisecond,
		DrainDeadline:    time.Second,
		NodeProbePorts: func(*state.Pod) []uint16 {
			if p := f.nodePorts.Load(); p != nil {
				return *p
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.dp.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return f
}

// tunneledPair enrolls pods a (127.0.0.11) and b (127.0.0.12), waits until
// both are verified, and resolves every destination to b's HBONE server:
// a's connections then travel a's pool -> b's server.
func (f *fixture) tunneledPair() (a, b *state.Pod) {
	f.t.Helper()
	a, b = f.pod("a", "127.0.0.11"), f.pod("b", "127.0.0.12")
	f.apply(a, b)
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	f.waitStatus("mesh/b", telemetry.CaptureVerified)
	tunnel := f.capture.Pod("mesh/b").HBONE.Addr().(*net.TCPAddr).AddrPort().Port()
	viaB := proxy.ResolverFunc(func(_ *proxy.Workload, dst netip.AddrPort) (proxy.Destination, error) {
		return proxy.Destination{Endpoints: []proxy.Endpoint{{Addr: dst, Workload: "mesh/b", Enrolled: true, Identity: b.Identity, TunnelPort: tunnel}}}, nil
	})
	f.resolve.Store(&viaB)
	return a, b
}

func (f *fixture) pod(name, ip string) *state.Pod {
	return state.WithDetail(state.Pod{Namespace: "mesh", Name: name, Enrolled: true, Phase: state.PodRunning,
		IPs: []netip.Addr{netip.MustParseAddr(ip)}, Identity: f.ca.ID("mesh", name), Ref: "mesh/" + name}, state.PodDetail{UID: "uid-" + name, Netns: "/fake/" + name})
}

// apply plans and applies, as the node's reconcile loop does.
func (f *fixture) apply(want ...*state.Pod) {
	f.dp.Apply(context.Background(), workloads.Plan(f.dp.Served(), want))
}

func (f *fixture) statusOf(pod string) telemetry.CaptureStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status[pod]
}

func (f *fixture) waitStatus(pod string, want telemetry.CaptureStatus) {
	f.t.Helper()
	waitfor.True(f.t, 20*time.Second, pod+" "+string(want), func() bool { return f.statusOf(pod) == want })
}

func echoServer(t *testing.T, ip string) netip.AddrPort {
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// roundTrip plays pod's application: a connection captured to the pod's
// outbound listener, towards the echo server.
func (f *fixture) roundTrip(pod string) error { return f.roundTripTo(pod, f.echo) }

func (f *fixture) roundTripTo(pod string, dst netip.AddrPort) error {
	p := f.capture.Pod(pod)
	if p == nil {
		return errors.New(pod + " is not captured")
	}
	p.SetDst(dst)
	c, err := net.Dial("tcp", p.Outbound.Addr().String())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if string(b) != "ping" {
		return errors.New("echo returned " + string(b))
	}
	return nil
}

func TestEnrollServeUnenroll(t *testing.T) {
	f := newFixture(t)
	a := f.pod("a", "127.0.0.11")
	f.apply(a)
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	if err := f.dp.Ready(); err != nil {
		t.Fatalf("Ready with the only pod verified: %v", err)
	}
	if s := f.dp.Served()[a.Key()]; !s.Captured || s.Failed {
		t.Fatalf("Served: %+v", s)
	}
	if err := f.roundTrip("mesh/a"); err != nil {
		t.Fatalf("connection through the pod's proxy: %v", err)
	}
	if got := f.svids.Owners(); got != 1 {
		t.Fatalf("%d SVID owners, want 1", got)
	}

	f.apply() // the pod left
	if f.capture.Pod("mesh/a") != nil {
		t.Fatal("the pod is still captured after it left")
	}
	if got := f.statusOf("mesh/a"); got != "" {
		t.Fatalf("status %q after the pod left, want none", got)
	}
	waitfor.True(t, 20*time.Second, "the SVID claim to be dropped after the drain", func() bool { return f.svids.Owners() == 0 })
	if len(f.dp.Served()) != 0 || len(f.dp.Pods()) != 0 {
		t.Fatal("the pod is still served")
	}
}

// TestHBONEBetweenPods: pod a's connection to an application of pod b goes
// through a's pool and b's HBONE server, with the SVIDs the data plane
// claimed for them.
func TestHBONEBetweenPods(t *testing.T) {
	f := newFixture(t)
	a, b := f.tunneledPair()
	app := echoServer(t, "127.0.0.12")
	if err := f.roundTripTo("mesh/a", app); err != nil {
		t.Fatalf("a to b over HBONE: %v", err)
	}
	if s := f.dp.PoolStats(); s.Handshakes == 0 || s.Misses == 0 {
		t.Fatalf("no tunnel in the pools' counters: %+v", s)
	}
	if s := f.dp.TunnelStats(); s.Handshakes == 0 {
		t.Fatalf("no handshake in the inbound servers' counters: %+v", s)
	}
	// A pod that leaves keeps its counters in the totals.
	before := f.dp.TunnelStats().Handshakes
	f.apply(a)
	waitfor.True(t, 30*time.Second, "b's proxy retired", func() bool { _, ok := f.dp.Served()[b.Key()]; return !ok })
	if s := f.dp.TunnelStats(); s.Handshakes < before {
		t.Fatalf("handshakes went from %d to %d when b left", before, s.Handshakes)
	}
}

func TestFailedEnrollmentIsRetried(t *testing.T) {
	f := newFixture(t)
	a := f.pod("a", "127.0.0.11")
	f.capture.FailEnroll("mesh/a", errors.New("no such netns"))
	f.apply(a)
	if got := f.statusOf("mesh/a"); got != telemetry.CaptureFailed {
		t.Fatalf("status %q after a failed enrollment, want failed", got)
	}
	if err := f.dp.Ready(); err == nil {
		t.Fatal("ready with a failed pod")
	}
	if s := f.dp.Served()[a.Key()]; s.Captured || !s.Failed {
		t.Fatalf("Served after a failed enrollment: %+v", s)
	}
	f.apply(a) // the next reconcile retries
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	if err := f.roundTrip("mesh/a"); err != nil {
		t.Fatal(err)
	}
}

func TestFailedSelfCheckKeepsCapture(t *testing.T) {
	f := newFixture(t)
	a := f.pod("a", "127.0.0.11")
	f.capture.FailSelfCheck("mesh/a", errors.New("probe not steered"))
	f.apply(a)
	f.waitStatus("mesh/a", telemetry.CaptureFailed)
	captured := f.capture.Pod("mesh/a")
	if captured == nil {
		t.Fatal("a pod whose self-check failed was released (plain networking)")
	}
	f.capture.FailSelfCheck("mesh/a", nil)
	f.apply(a) // recheck
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	if f.capture.Pod("mesh/a") != captured {
		t.Fatal("the recheck re-enrolled the pod instead of checking it again")
	}
}

func TestFailedSVIDRequest(t *testing.T) {
	f := newFixture(t)
	f.svids.FailAdd(errors.New("CA unreachable"))
	f.apply(f.pod("a", "127.0.0.11"))
	if got := f.statusOf("mesh/a"); got != telemetry.CaptureFailed || f.capture.Pod("mesh/a") != nil {
		t.Fatalf("status %q, captured %v; want failed and not captured", got, f.capture.Pod("mesh/a") != nil)
	}
	f.svids.FailAdd(nil)
	f.apply(f.pod("a", "127.0.0.11"))
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
}

func TestExcludedPortsUpdatedInPlace(t *testing.T) {
	f := newFixture(t)
	a := f.pod("a", "127.0.0.11")
	f.apply(a)
	captured := f.capture.Pod("mesh/a")
	b := *a
	d := b.Detail()
	d.ExcludeOutboundPorts = []uint16{5432}
	b.SetDetail(d)
	f.apply(&b)
	if f.capture.Pod("mesh/a") != captured {
		t.Fatal("changing excluded ports re-enrolled the pod")
	}
	if u := f.capture.Updates(); len(u) != 1 || len(u[0].ExcludeOutboundPorts) != 1 {
		t.Fatalf("capture updates %+v", u)
	}
	if plan := workloads.Plan(f.dp.Served(), []*state.Pod{&b}); len(plan) != 0 {
		t.Fatalf("plan after the update: %+v, want none", plan)
	}
}

// TestConcurrentReaders enrolls and unenrolls pods while the admin and
// metrics readers run, so that -race sees every field they share (the
// pods' pool and proxy were once written without the lock they were read
// under).
func TestConcurrentReaders(t *testing.T) {
	f := newFixture(t)
	a, b := f.pod("a", "127.0.0.11"), f.pod("b", "127.0.0.12")
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for ctx.Err() == nil {
				f.dp.PoolStats()
				f.dp.PoolsDump()
				f.dp.Pods()
				f.dp.Connections()
				f.dp.Served()
				_ = f.dp.Ready()
				f.dp.Reevaluate(ctx)
			}
		})
	}
	for range 20 {
		f.apply(a, b)
		f.apply(b)
		f.apply()
	}
	f.apply(a)
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	cancel()
	wg.Wait()
}

func TestDrainAndClose(t *testing.T) {
	f := newFixture(t)
	f.apply(f.pod("a", "127.0.0.11"), f.pod("b", "127.0.0.12"))
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	f.waitStatus("mesh/b", telemetry.CaptureVerified)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.dp.Drain(ctx); err != nil {
		t.Fatalf("Drain without connections: %v", err)
	}
	// Close (in Cleanup) must still stop everything; TestMain checks that
	// no goroutine or descriptor is left.
}

func TestConfigRequired(t *testing.T) {
	if _, err := dataplane.New(dataplane.Config{}); err == nil {
		t.Fatal("New with an empty config succeeded")
	}
}

// TestNodeProbePortsFollowPolicy: a pod is enrolled with the probe ports
// the policy opens to the node, and RefreshNodeProbePorts (after a policy
// change) updates capture only when they changed.
func TestNodeProbePortsFollowPolicy(t *testing.T) {
	f := newFixture(t)
	ports := []uint16{8081}
	f.nodePorts.Store(&ports)
	a := f.pod("a", "127.0.0.11")
	f.apply(a)
	f.waitStatus("mesh/a", telemetry.CaptureVerified)
	if got := f.capture.Pod("mesh/a").Spec.NodeProbePorts; !slices.Equal(got, ports) {
		t.Fatalf("enrolled with node probe ports %v, want %v", got, ports)
	}
	f.dp.RefreshNodeProbePorts(context.Background())
	if n := len(f.capture.Updates()); n != 0 {
		t.Fatalf("%d updates although nothing changed", n)
	}
	// A DENY AuthorizationPolicy now selects the pod: none.
	f.nodePorts.Store(nil)
	f.dp.RefreshNodeProbePorts(context.Background())
	up := f.capture.Updates()
	if len(up) != 1 || up[0].Name != "mesh/a" || up[0].NodeProbePorts != nil {
		t.Fatalf("updates %+v, want one for mesh/a without node probe ports", up)
	}
	f.dp.RefreshNodeProbePorts(context.Background())
	if n := len(f.capture.Updates()); n != 1 {
		t.Errorf("%d updates, want still 1", n)
	}
}
