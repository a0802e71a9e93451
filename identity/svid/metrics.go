package svid

import (
	"crypto/x509"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
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
func (m *Manager) Collector() prometheus.Collector {
	return ExpiryCollector(func() (map[spiffeid.ID]*x509svid.SVID, []*x509.Certificate) {
		m.mu.RLock()
		defer m.mu.RUnlock()
		held := make(map[spiffeid.ID]*x509svid.SVID, len(m.entries))
		for id, e := range m.entries {
			if e.svid != nil {
				held[id] = e.svid
			}
		}
		var roots []*x509.Certificate
		if m.bundle != nil {
			roots = m.bundle.X509Authorities()
		}
		return held, roots
	})
}

// ExpiryCollector exports, at each scrape, the expiry of the SVIDs and
// roots snapshot returns, under the metric names every identity source of
// the agent shares (the built-in CA's Manager, the Workload API source).
func ExpiryCollector(snapshot func() (map[spiffeid.ID]*x509svid.SVID, []*x509.Certificate)) prometheus.Collector {
	return collector{snapshot}
}

type collector struct {
	snapshot func() (map[spiffeid.ID]*x509svid.SVID, []*x509.Certificate)
}

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSVIDExpiry
	ch <- descRootExpiry
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	svids, roots := c.snapshot()
	for id, sv := range svids {
		if sv == nil || len(sv.Certificates) == 0 {
			continue
		}
		ch <- prometheus.MustNewConstMetric(descSVIDExpiry, prometheus.GaugeValue,
			float64(sv.Certificates[0].NotAfter.Unix()), id.String())
	}
	seen := map[string]bool{}
	for _, r := range roots {
		subj := r.Subject.String()
		if seen[subj] {
			subj += " " + r.SerialNumber.String() // two roots, one name (rotation)
		}
		seen[subj] = true
		ch <- prometheus.MustNewConstMetric(descRootExpiry, prometheus.GaugeValue, float64(r.NotAfter.Unix()), subj)
	}
}
