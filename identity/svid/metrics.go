package svid

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	descSVIDExpiry = prometheus.NewDesc("nodemesh_svid_expiry_timestamp_seconds",
		"When each SVID this agent holds expires (Unix seconds); absent until the first one is issued.",
		[]string{"spiffe_id"}, nil)
	descRootExpiry = prometheus.NewDesc("nodemesh_root_expiry_timestamp_seconds",
		"When each trust-bundle root this agent trusts expires (Unix seconds).",
		[]string{"subject"}, nil)
)

// Collector exports the expiry of the held SVIDs and of the trust bundle's
// roots as gauges, for alerts such as
// "nodemesh_svid_expiry_timestamp_seconds - time() < 600".
func (m *Manager) Collector() prometheus.Collector { return collector{m} }

type collector struct{ m *Manager }

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSVIDExpiry
	ch <- descRootExpiry
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.RLock()
	defer c.m.mu.RUnlock()
	for id, e := range c.m.entries {
		if e.svid == nil || len(e.svid.Certificates) == 0 {
			continue
		}
		ch <- prometheus.MustNewConstMetric(descSVIDExpiry, prometheus.GaugeValue,
			float64(e.svid.Certificates[0].NotAfter.Unix()), id.String())
	}
	if c.m.bundle == nil {
		return
	}
	seen := map[string]bool{}
	for _, r := range c.m.bundle.X509Authorities() {
		subj := r.Subject.String()
		if seen[subj] {
			subj += " " + r.SerialNumber.String() // two roots, one name (rotation)
		}
		seen[subj] = true
		ch <- prometheus.MustNewConstMetric(descRootExpiry, prometheus.GaugeValue, float64(r.NotAfter.Unix()), subj)
	}
}
