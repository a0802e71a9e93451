package fromstate

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/l7/authz"
	l7mesh "github.com/nodemesh/nodemesh/agent/l7/mesh"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/telemetry"
)

// scaleSvcsPerNS Services per namespace, as the scale profile loads them
// (bench/scaleload.go): Service s selects workload s of its namespace,
// with one EndpointSlice listing its ten pods. The Services of every
// tenth namespace opt in to L7, so the L7 layer's index has claims.
const scaleSvcsPerNS = 5

func scaleService(n, s int) *state.Service {
	svc := &state.Service{Namespace: scaleNS(n), Name: fmt.Sprintf("svc-%d", s),
		ClusterIPs: []netip.Addr{netip.AddrFrom4([4]byte{172, 16 + byte(n>>8), byte(n), byte(s)})},
		Ports:      []state.ServicePort{{Name: "http", Protocol: "TCP", Port: 80, TargetPort: 8080}}}
	if n%10 == 0 {
		svc.Labels = map[string]string{l7.LabelL7: l7.ValueEnabled}
	}
	return svc
}

func scaleSlice(n, s int) *state.EndpointSlice {
	es := &state.EndpointSlice{Namespace: scaleNS(n), Name: fmt.Sprintf("svc-%d-1", s), Service: fmt.Sprintf("svc-%d", s), AddressType: "IPv4",
		Ports: []state.EndpointPort{{Name: "http", Protocol: "TCP", Port: 8080}}}
	for w := range scalePodsPerNS / 10 {
		i := n*scalePodsPerNS + w*10 + s // the pods of workload s
		k := state.Key{Namespace: scaleNS(n), Name: fmt.Sprintf("pod-%06d", i)}
		es.Endpoints = append(es.Endpoints, state.Endpoint{Addresses: []netip.Addr{scaleIP(i)}, Ready: true, Serving: true, Pod: &k})
	}
	return es
}

// BenchmarkAgentChange is what one change costs everything the agent runs
// per state change (agent/node's loop, less the pod reconcile of its own
// node): the change applied to the state store, the next state snapshot,
// the policy snapshot (the long-lived Builder), the L7 layer's claimed
// ports (Refresh), telemetry's Service index (Refresh), and then one
// inbound connection labelled (under churn nearly every connection comes
// after a change). The cluster is BenchmarkPolicyChange's with the scale
// profile's Services. pod-relabel is what the scale profile's churn does;
// slice-change replaces an opted-in Service's EndpointSlice.
func BenchmarkAgentChange(b *testing.B) {
	for _, pods := range []int{10000, 100000} {
		if pods > 10000 && testing.Short() {
			continue
		}
		nss := pods / scalePodsPerNS
		labels := scaleLabels()
		st := scaleStore(b, pods)
		st.Update(func(tx *state.Tx) {
			for n := range nss {
				for s := range scaleSvcsPerNS {
					tx.SetService(scaleService(n, s))
					tx.SetEndpointSlice(scaleSlice(n, s))
				}
			}
		})
		bl := NewBuilder("")
		if _, errs := bl.Snapshot(st.Snapshot()); len(errs) > 0 {
			b.Fatal(errs)
		}
		layer, err := l7mesh.New(l7mesh.Config{State: st.Snapshot,
			Authorize: func(*proxy.Flow, *authz.Request) proxy.Decision { return proxy.Decision{} }})
		if err != nil {
			b.Fatal(err)
		}
		layer.Refresh(st.Snapshot())
		m, err := admin.NewMetrics(prometheus.NewRegistry(), nil)
		if err != nil {
			b.Fatal(err)
		}
		obs := telemetry.New(telemetry.Config{Metrics: m, State: st.Snapshot})
		// The inbound connection: to a pod of an opted-in Service.
		dst := scalePod(3, 3, labels)
		conn := &proxy.ConnInfo{Start: time.Now(), Flow: proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportHBONE,
			Workload: &proxy.Workload{Namespace: dst.Namespace, Name: dst.Name},
			Src:      netip.AddrPortFrom(scaleIP(pods-1), 40000), Dst: netip.AddrPortFrom(dst.IPs[0], 8080)}}
		obs.Opened(conn)
		obs.Closed(conn, "")
		if _, ok := layer.InboundPort(conn.Flow.Workload, 8080); !ok {
			b.Fatal("the opted-in Service's pod is not claimed")
		}
		kinds := []struct {
			name   string
			change func(tx *state.Tx, i int)
		}{
			{"pod-relabel", func(tx *state.Tx, i int) {
				p := (i * 7919) % pods
				tx.SetPod(scalePod(p, (p+1+i%2)%10, labels))
			}},
			{"slice-change", func(tx *state.Tx, i int) {
				n := (i * 10) % nss // an opted-in namespace
				es := scaleSlice(n, i%scaleSvcsPerNS)
				if i%2 == 0 {
					es.Endpoints = es.Endpoints[1:]
				}
				tx.SetEndpointSlice(es)
			}},
		}
		for _, k := range kinds {
			b.Run(fmt.Sprintf("pods=%d/%s", pods, k.name), func(b *testing.B) {
				b.ReportAllocs()
				i := 0
				start := cpuTime(b)
				for b.Loop() {
					st.Update(func(tx *state.Tx) { k.change(tx, i) })
					snap := st.Snapshot()
					if _, errs := bl.Snapshot(snap); len(errs) > 0 {
						b.Fatal(errs)
					}
					layer.Refresh(snap)
					obs.Refresh(snap)
					obs.Opened(conn)
					obs.Closed(conn, "")
					i++
				}
				b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
				if i%2 == 1 { // leave the cluster as it was
					st.Update(func(tx *state.Tx) { k.change(tx, i) })
				}
			})
		}
	}
}
