package telemetry

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/state"
)

// referenceInbound is the index as it was rebuilt for every state version:
// each backend address's first Service by namespace/name.
func referenceInbound(snap *state.Snapshot) map[netip.AddrPort]state.Key {
	out := make(map[netip.AddrPort]state.Key)
	for _, svc := range snap.Services() {
		for _, port := range svc.Ports {
			for _, b := range snap.Backends(svc, port) {
				if _, dup := out[b.Addr]; !dup {
					out[b.Addr] = svc.Key()
				}
			}
		}
	}
	return out
}

// TestInboundServicesMatchesRebuild applies thousands of random changes
// (Services sharing backend addresses, slices moving between Services,
// Services and their ports coming and going, Resets) to one store and
// checks, after every round, that the incrementally kept index answers
// every address as a rebuild from scratch does, both when a lookup brings
// it to the new snapshot and when Refresh does.
func TestInboundServicesMatchesRebuild(t *testing.T) {
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
	addrs := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("fd00::1")}
	ports := []uint16{8080, 9090}
	var all []netip.AddrPort
	for _, a := range addrs {
		for _, p := range ports {
			all = append(all, netip.AddrPortFrom(a, p))
		}
	}
	var idx inboundServices
	owned := 0
	for round := range rounds {
		for range 1 + rng.IntN(3) {
			st.Update(func(tx *state.Tx) {
				for range 1 + rng.IntN(3) {
					ns := []string{"a", "b"}[rng.IntN(2)]
					del := rng.IntN(5) == 0
					switch r := rng.IntN(100); {
					case r == 0:
						tx.Reset()
					case r < 40:
						k := state.Key{Namespace: ns, Name: fmt.Sprintf("svc%d", rng.IntN(3))}
						if del {
							tx.DeleteService(k)
							continue
						}
						svc := &state.Service{Namespace: ns, Name: k.Name}
						for range rng.IntN(3) {
							svc.Ports = append(svc.Ports, state.ServicePort{Name: []string{"", "http", "grpc"}[rng.IntN(3)], Protocol: "TCP", Port: 80})
						}
						tx.SetService(svc)
					default:
						k := state.Key{Namespace: ns, Name: fmt.Sprintf("es%d", rng.IntN(4))}
						if del {
							tx.DeleteEndpointSlice(k)
							continue
						}
						es := &state.EndpointSlice{Namespace: ns, Name: k.Name, Service: fmt.Sprintf("svc%d", rng.IntN(3))}
						for range 1 + rng.IntN(2) {
							es.Ports = append(es.Ports, state.EndpointPort{Name: []string{"", "http", "grpc"}[rng.IntN(3)], Port: ports[rng.IntN(2)]})
						}
						for range rng.IntN(4) {
							es.Endpoints = append(es.Endpoints, state.Endpoint{Addresses: []netip.Addr{addrs[rng.IntN(len(addrs))]}, Ready: true})
						}
						tx.SetEndpointSlice(es)
					}
				}
			})
			if rng.IntN(3) == 0 {
				st.Snapshot() // one the index never sees
			}
		}
		snap := st.Snapshot()
		if rng.IntN(2) == 0 {
			idx.refresh(snap)
		}
		want := referenceInbound(snap)
		for _, ap := range all {
			k, ok := idx.lookup(snap, ap)
			if w, wok := want[ap]; ok != wok || k != w {
				t.Fatalf("seed %d, round %d: %v belongs to %v (%t), a rebuild says %v (%t)", seed, round, ap, k, ok, w, wok)
			}
		}
		owned += len(want)
	}
	if owned == 0 {
		t.Fatal("no address had a Service: the test checks nothing")
	}
}
