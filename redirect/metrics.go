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
	ch <- descEvents
}

func (k collector) Collect(ch chan<- prometheus.Metric) {
	st := k.c.Status()
	ch <- prometheus.MustNewConstMetric(descAccel, prometheus.GaugeValue, b2f(st.Accel), st.AccelReason)
	for _, p := range st.Pods {
		ch <- prometheus.MustNewConstMetric(descPodVerified, prometheus.GaugeValue, b2f(p.Verified), p.Name, cookieName(p.Cookie))
	}
	stats, err := k.c.Stats()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descEvents, err)
		return
	}
	for name, v := range stats {
		ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(v), name)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
