package redirect

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	descAccel = prometheus.NewDesc("nodemesh_capture_accel_enabled",
		"1 when same-node sk_msg acceleration is on; see the accel_reason label for why (not).",
		[]string{"reason"}, nil)
	descPodVerified = prometheus.NewDesc("nodemesh_capture_pod_verified",
		"1 when the pod's capture self-check passed; 0 means the pod must not be treated as captured.",
		[]string{"pod", "netns_cookie"}, nil)
	descSourcePreserved = prometheus.NewDesc("nodemesh_capture_pod_source_preserved",
		"1 when inbound connections reach the pod's applications from the peer's address (transparent delivery); 0: from the pod's own IP (the log says why).",
		[]string{"pod", "netns_cookie"}, nil)
	descDeliveries = prometheus.NewDesc("nodemesh_capture_deliveries_total",
		"Inbound connections delivered to applications, by source address: peer (transparent) or pod_ip (the pod's own address).",
		[]string{"source"}, nil)
	descEvents = prometheus.NewDesc("nodemesh_capture_events_total",
		"Decisions of the capture programs, summed over CPUs.",
		[]string{"event"}, nil)
)

// Collector exports capture state to Prometheus: acceleration on/off with
// its reason, per-pod verification, and the programs' counters.
func (c *Capture) Collector() prometheus.Collector { return collector{c} }

type collector struct{ c *Capture }

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descAccel
	ch <- descPodVerified
	ch <- descSourcePreserved
	ch <- descDeliveries
	ch <- descEvents
}

func (k collector) Collect(ch chan<- prometheus.Metric) {
	st := k.c.Status()
	ch <- prometheus.MustNewConstMetric(descAccel, prometheus.GaugeValue, b2f(st.Accel), st.AccelReason)
	for _, p := range st.Pods {
		ch <- prometheus.MustNewConstMetric(descPodVerified, prometheus.GaugeValue, b2f(p.Verified), p.Name, cookieName(p.Cookie))
		if p.Name != "" {
			ch <- prometheus.MustNewConstMetric(descSourcePreserved, prometheus.GaugeValue, b2f(p.SourcePreserved), p.Name, cookieName(p.Cookie))
		}
	}
	ch <- prometheus.MustNewConstMetric(descDeliveries, prometheus.CounterValue, float64(k.c.deliveries[0].Load()), "peer")
	ch <- prometheus.MustNewConstMetric(descDeliveries, prometheus.CounterValue, float64(k.c.deliveries[1].Load()), "pod_ip")
	stats, err := k.c.Stats()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descEvents, err)
		return
	}
	for name, v := range stats {
		ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(v), name)
	}
	ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(k.c.noOrigDst.Load()), "outbound_no_origdst")
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
