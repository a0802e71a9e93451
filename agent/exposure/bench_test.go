package exposure

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkRecord is the per-connection cost (on close) of the ledger.
func BenchmarkRecord(b *testing.B) {
	l, err := New(Config{Node: "n", Registerer: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	e := Event{Direction: Outbound, Src: "client/c1", SrcNamespace: "client", Dst: "shop/web-3", DstNamespace: "shop", DstEnrolled: true, Bytes: 1500}
	b.ReportAllocs()
	for b.Loop() {
		l.Record(e)
	}
}
