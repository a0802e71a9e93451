package l7

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/state"
)

// ClaimedPorts looks only at opted-in Services; when several target one
// pod port, a declared protocol wins over detection and, between declared
// ones, the Service first by namespace and name wins, whatever order the
// snapshot holds them in.
func TestClaimedPorts(t *testing.T) {
	ip := netip.MustParseAddr
	for _, tc := range []struct {
		name string
		svcs map[string]string // Service name -> appProtocol ("-" not opted in)
		want Protocol
		ok   bool
	}{
		{"undeclared only", map[string]string{"a": ""}, Undeclared, true},
		{"declared wins, first", map[string]string{"a": "http", "b": ""}, HTTP1, true},
		{"declared wins, second", map[string]string{"a": "", "b": "grpc"}, GRPC, true},
		{"first declared by name", map[string]string{"a": "grpc", "b": "http"}, GRPC, true},
		{"first declared by name, reversed", map[string]string{"a": "http", "b": "grpc"}, HTTP1, true},
		{"not opted in ignored", map[string]string{"a": "-", "b": "h2c"}, H2C, true},
		{"nothing opted in", map[string]string{"a": "-"}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
			if err != nil {
				t.Fatal(err)
			}
			st.Update(func(tx *state.Tx) {
				tx.SetNamespace(&state.Namespace{Name: "shop"})
				tx.SetPod(&state.Pod{Namespace: "shop", Name: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.1")}})
				i := 0
				for name, app := range tc.svcs {
					i++
					labels := map[string]string{LabelL7: ValueEnabled}
					if app == "-" {
						labels, app = nil, "http"
					}
					tx.SetService(&state.Service{Namespace: "shop", Name: name, Labels: labels,
						ClusterIPs: []netip.Addr{ip(fmt.Sprintf("10.96.0.%d", i))},
						Ports:      []state.ServicePort{{Name: "p", Port: 80, TargetPort: 8080, Protocol: "TCP", AppProtocol: app}}})
					tx.SetEndpointSlice(&state.EndpointSlice{Namespace: "shop", Name: name + "-1", Service: name,
						Ports:     []state.EndpointPort{{Name: "p", Port: 8080}},
						Endpoints: []state.Endpoint{{Addresses: []netip.Addr{ip("10.0.0.1")}, Ready: true, Pod: &state.Key{Namespace: "shop", Name: "web"}}}})
				}
			})
			ports := ClaimedPorts(st.Snapshot())
			var x ClaimIndex
			if d := compareClaims(x.Update(st.Snapshot()), ports); d != "" {
				t.Errorf("ClaimIndex differs from ClaimedPorts: %s", d)
			}
			if !tc.ok {
				if ports != nil {
					t.Fatalf("claimed %v, want nil", ports)
				}
				return
			}
			got, ok := ports[state.Key{Namespace: "shop", Name: "web"}][8080]
			if !ok || got != tc.want {
				t.Errorf("port 8080: %v %v, want %v", got, ok, tc.want)
			}
		})
	}
}

// The namespace's label opts in the Services that do not decide for
// themselves, and the index follows the namespace's flips, a Service
// leaving its namespace's choice, and the pod a backend resolves to.
func TestClaimIndexFollowsChanges(t *testing.T) {
	ip := netip.MustParseAddr
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	web := state.Key{Namespace: "shop", Name: "web"}
	svc := func(name string, labels map[string]string) *state.Service {
		return &state.Service{Namespace: "shop", Name: name, Labels: labels, ClusterIPs: []netip.Addr{ip("10.96.0.1")},
			Ports: []state.ServicePort{{Name: "p", Port: 80, TargetPort: 8080, Protocol: "TCP"}}}
	}
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop"})
		tx.SetPod(&state.Pod{Namespace: "shop", Name: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.1")}})
		tx.SetService(svc("a", nil))
		tx.SetEndpointSlice(&state.EndpointSlice{Namespace: "shop", Name: "a-1", Service: "a",
			Ports: []state.EndpointPort{{Name: "p", Port: 8080}}, Endpoints: []state.Endpoint{{Addresses: []netip.Addr{ip("10.0.0.1")}, Ready: true}}})
	})
	var x ClaimIndex
	steps := []struct {
		name   string
		change func(tx *state.Tx)
		ok     bool
	}{
		{"nothing opted in", func(*state.Tx) {}, false},
		{"namespace opts in", func(tx *state.Tx) {
			tx.SetNamespace(&state.Namespace{Name: "shop", Labels: map[string]string{LabelL7: ValueEnabled}})
		}, true},
		{"Service opts out", func(tx *state.Tx) { tx.SetService(svc("a", map[string]string{LabelL7: ValueDisabled})) }, false},
		{"Service's typo follows the namespace", func(tx *state.Tx) { tx.SetService(svc("a", map[string]string{LabelL7: "yes"})) }, true},
		{"the pod leaves its address", func(tx *state.Tx) {
			tx.SetPod(&state.Pod{Namespace: "shop", Name: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.2")}})
		}, false},
		{"and comes back", func(tx *state.Tx) {
			tx.SetPod(&state.Pod{Namespace: "shop", Name: "web", Phase: state.PodRunning, IPs: []netip.Addr{ip("10.0.0.1")}})
		}, true},
		{"namespace opts out", func(tx *state.Tx) { tx.SetNamespace(&state.Namespace{Name: "shop"}) }, false},
	}
	for _, step := range steps {
		st.Update(step.change)
		snap := st.Snapshot()
		c := x.Update(snap)
		if d := compareClaims(c, ClaimedPorts(snap)); d != "" {
			t.Fatalf("%s: ClaimIndex differs from ClaimedPorts: %s", step.name, d)
		}
		if _, ok := c.Port(web, 8080); ok != step.ok {
			t.Fatalf("%s: port 8080 claimed %t, want %t", step.name, ok, step.ok)
		}
	}
}

// compareClaims describes how c differs from want, ClaimedPorts' answer
// ("" when it does not).
func compareClaims(c Claims, want map[state.Key]map[uint16]Protocol) string {
	got := maps.Collect(c.ports.All())
	if len(got) == 0 && len(want) == 0 {
		return ""
	}
	for k, ports := range want {
		if !maps.Equal(got[k], ports) {
			return fmt.Sprintf("pod %v: %v, want %v", k, got[k], ports)
		}
	}
	for k, ports := range got {
		if _, ok := want[k]; !ok {
			return fmt.Sprintf("pod %v: %v, want none", k, ports)
		}
	}
	if c.Pods() != len(want) {
		return fmt.Sprintf("%d pods counted, want %d", c.Pods(), len(want))
	}
	return ""
}

// TestClaimIndexMatchesClaimedPorts applies thousands of random changes to
// a small cluster (pods sharing and moving addresses, Services and
// namespaces opting in and out, slices moving between Services and
// referencing pods that come and go) through one store, and after every
// round compares a long-lived ClaimIndex with ClaimedPorts computed from
// scratch. Snapshots the index never sees are taken in between, as the
// agent's connections do.
func TestClaimIndexMatchesClaimedPorts(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed>>1))
	rounds := 3000
	if testing.Short() {
		rounds = 500
	}
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	var x ClaimIndex
	claimed := 0
	for round := range rounds {
		for range 1 + rng.IntN(3) {
			st.Update(func(tx *state.Tx) {
				for range 1 + rng.IntN(4) {
					randomClaimChange(rng, tx)
				}
			})
			if rng.IntN(3) == 0 {
				st.Snapshot() // one the index never sees
			}
		}
		snap := st.Snapshot()
		want := ClaimedPorts(snap)
		if d := compareClaims(x.Update(snap), want); d != "" {
			t.Fatalf("seed %d, round %d: ClaimIndex differs from ClaimedPorts: %s", seed, round, d)
		}
		claimed += len(want)
	}
	if claimed == 0 {
		t.Fatal("no round claimed any port: the test checks nothing")
	}
}

var (
	randNS    = []string{"a", "b"}
	randAddrs = []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("fd00::1")}
	randOptIn = []string{"", ValueEnabled, ValueEnabled, ValueDisabled, "yes"}
)

func pick[T any](rng *rand.Rand, from []T) T { return from[rng.IntN(len(from))] }

func randKey(rng *rand.Rand, prefix string, n int) state.Key {
	return state.Key{Namespace: pick(rng, randNS), Name: fmt.Sprintf("%s%d", prefix, rng.IntN(n))}
}

func optInLabels(rng *rand.Rand) map[string]string {
	if v := pick(rng, randOptIn); v != "" {
		return map[string]string{LabelL7: v}
	}
	return nil
}

func randomClaimChange(rng *rand.Rand, tx *state.Tx) {
	del := rng.IntN(5) == 0
	switch r := rng.IntN(100); {
	case r == 0:
		tx.Reset()
	case r < 10:
		name := pick(rng, randNS)
		if del {
			tx.DeleteNamespace(name)
			return
		}
		tx.SetNamespace(&state.Namespace{Name: name, Labels: optInLabels(rng)})
	case r < 45:
		k := randKey(rng, "p", 5)
		if del {
			tx.DeletePod(k)
			return
		}
		p := &state.Pod{Namespace: k.Namespace, Name: k.Name, Phase: pick(rng, []state.PodPhase{state.PodRunning, state.PodRunning, state.PodSucceeded}),
			HostNetwork: rng.IntN(10) == 0, Labels: map[string]string{"app": pick(rng, []string{"x", "y"})}}
		for range rng.IntN(3) {
			p.IPs = append(p.IPs, pick(rng, randAddrs))
		}
		tx.SetPod(p)
	case r < 70:
		k := randKey(rng, "svc", 3)
		if del {
			tx.DeleteService(k)
			return
		}
		svc := &state.Service{Namespace: k.Namespace, Name: k.Name, Labels: optInLabels(rng)}
		for range rng.IntN(3) {
			svc.Ports = append(svc.Ports, state.ServicePort{Name: pick(rng, []string{"", "http", "grpc"}),
				Protocol: pick(rng, []string{"TCP", "TCP", "UDP", ""}), Port: 80,
				AppProtocol: pick(rng, []string{"", "", "http", "grpc", "kubernetes.io/h2c", "https"})})
		}
		tx.SetService(svc)
	default:
		k := randKey(rng, "es", 4)
		if del {
			tx.DeleteEndpointSlice(k)
			return
		}
		es := &state.EndpointSlice{Namespace: k.Namespace, Name: k.Name, Service: pick(rng, []string{"", "svc0", "svc1", "svc2"})}
		for range 1 + rng.IntN(2) {
			es.Ports = append(es.Ports, state.EndpointPort{Name: pick(rng, []string{"", "http", "grpc"}), Port: pick(rng, []uint16{8080, 9090})})
		}
		for range rng.IntN(4) {
			e := state.Endpoint{Addresses: []netip.Addr{pick(rng, randAddrs)}, Ready: rng.IntN(4) > 0, Serving: true, Terminating: rng.IntN(4) == 0}
			if rng.IntN(3) > 0 {
				pk := state.Key{Namespace: k.Namespace, Name: fmt.Sprintf("p%d", rng.IntN(6))} // p5 never exists
				e.Pod = &pk
			}
			es.Endpoints = append(es.Endpoints, e)
		}
		tx.SetEndpointSlice(es)
	}
}
