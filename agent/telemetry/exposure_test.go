package telemetry

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/exposure"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/state"
)

func TestExposureEvent(t *testing.T) {
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	st.Update(func(tx *state.Tx) {
		tx.SetNamespace(&state.Namespace{Name: "shop", Labels: map[string]string{state.LabelMode: state.ModeEnabled}})
		tx.SetNamespace(&state.Namespace{Name: "outside"})
		tx.SetPod(state.WithDetail(state.Pod{Namespace: "shop", Name: "web-3", ServiceAccount: "web", Node: "n3", IPs: []netip.Addr{netip.MustParseAddr("10.0.3.2")}, Phase: state.PodRunning}, state.PodDetail{UID: "u1"}))
		tx.SetPod(state.WithDetail(state.Pod{Namespace: "outside", Name: "o-3", ServiceAccount: "o", Node: "n3", IPs: []netip.Addr{netip.MustParseAddr("10.0.3.3")}, Phase: state.PodRunning}, state.PodDetail{UID: "u2"}))
	})
	client := &proxy.Workload{Namespace: "client", Name: "c1"}
	web2 := &proxy.Workload{Namespace: "shop", Name: "web-2"}
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		name string
		info proxy.ConnInfo
		want exposure.Event
		ok   bool
	}{
		{"HBONE is not exposure", proxy.ConnInfo{Flow: proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportHBONE, Workload: client, Dst: ap("10.0.3.2:8080")}, Sent: 5}, exposure.Event{}, false},
		{"outbound to an enrolled pod without agent", proxy.ConnInfo{Flow: proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportPlaintext, Workload: client, Dst: ap("10.0.3.2:8080")}, Sent: 5, Received: 7},
			exposure.Event{Direction: exposure.Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "shop/web-3", DstNamespace: "shop", DstEnrolled: true, Bytes: 12}, true},
		{"outbound to an unenrolled pod", proxy.ConnInfo{Flow: proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportPlaintext, Workload: client, Dst: ap("10.0.3.3:80")}, Sent: 1},
			exposure.Event{Direction: exposure.Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "outside/o-3", DstNamespace: "outside", Bytes: 1}, true},
		{"outbound outside the cluster", proxy.ConnInfo{Flow: proxy.Flow{Direction: proxy.Outbound, Transport: proxy.TransportPlaintext, Workload: client, Dst: ap("192.0.2.1:443")}},
			exposure.Event{Direction: exposure.Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "192.0.2.1"}, true},
		{"inbound PERMISSIVE from a pod", proxy.ConnInfo{Flow: proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportPlaintext, Workload: web2, Src: ap("10.0.3.3:5000")}, Received: 3},
			exposure.Event{Direction: exposure.Inbound, Src: "outside/o-3", SrcNamespace: "outside", Dst: "shop/web-2", DstNamespace: "shop", DstEnrolled: true, Bytes: 3}, true},
		{"inbound PERMISSIVE from an unknown address", proxy.ConnInfo{Flow: proxy.Flow{Direction: proxy.Inbound, Transport: proxy.TransportPlaintext, Workload: web2, Src: ap("10.9.0.1:5000")}},
			exposure.Event{Direction: exposure.Inbound, Src: "10.9.0.1", Dst: "shop/web-2", DstNamespace: "shop", DstEnrolled: true}, true},
	} {
		got, ok := ExposureEvent(st.Snapshot(), &tc.info)
		if ok != tc.ok || got != tc.want {
			t.Errorf("%s: %+v %v, want %+v %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}
