package svid_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestExpiryGauges checks the expiry gauges against the SVID and roots
// the manager holds.
func TestExpiryGauges(t *testing.T) {
	e := newEnv(t, 2*time.Hour)
	if err := e.m.Add("uid-web-1", webID); err != nil {
		t.Fatal(err)
	}
	if err := e.m.Wait(waitCtx(t), webID); err != nil {
		t.Fatal(err)
	}
	s, err := e.m.SVIDSource(webID).GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(e.m.Collector())
	root := e.ca.Authority.Bundle()[0]
	want := `
# HELP nodemesh_root_expiry_timestamp_seconds When each trust-bundle root this agent trusts expires (Unix seconds).
# TYPE nodemesh_root_expiry_timestamp_seconds gauge
nodemesh_root_expiry_timestamp_seconds{subject="` + root.Subject.String() + `"} ` + itoa(root.NotAfter.Unix()) + `
# HELP nodemesh_svid_expiry_timestamp_seconds When each SVID this agent holds expires (Unix seconds); absent until the first one is issued.
# TYPE nodemesh_svid_expiry_timestamp_seconds gauge
nodemesh_svid_expiry_timestamp_seconds{spiffe_id="spiffe://cluster.local/ns/app/sa/web"} ` + itoa(s.Certificates[0].NotAfter.Unix()) + `
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }
