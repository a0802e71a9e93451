package main

import (
	"context"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes/fake"

	"github.com/nodemesh/nodemesh/cmd/nodemeshctl/internal/cluster"
)

// TestCheckIdentitySources judges the root and CA checks by where the
// agents take their SVIDs from: a SPIRE install with the nodemesh CA
// scaled to 0 (no CA pod, no bundle ConfigMap) passes, an agent that
// depends on the missing CA fails, and SPIRE's roots are judged by expiry.
func TestCheckIdentitySources(t *testing.T) {
	now := time.Now()
	spire := func(notAfter ...time.Time) identityInfo {
		id := identityInfo{Source: sourceSPIFFE}
		for _, na := range notAfter {
			id.Roots = append(id.Roots, rootInfo{Subject: "O=SPIRE", NotAfter: na})
		}
		return id
	}
	tests := []struct {
		name string
		src  identitySources
		want map[string]string // check/node -> status
	}{
		{"SPIRE only, CA scaled to 0, no bundle ConfigMap",
			identitySources{spiffe: map[string]identityInfo{"node-1": spire(now.Add(365 * 24 * time.Hour)), "node-2": spire(now.Add(400 * 24 * time.Hour))}},
			map[string]string{"root/node-1": "ok", "root/node-2": "ok", "ca/": "ok"}},
		{"CA agents with the CA scaled to 0",
			identitySources{ca: 2, spiffe: map[string]identityInfo{}},
			map[string]string{"root/": "fail", "ca/": "fail"}},
		{"mixed: a SPIRE agent and a CA agent, no CA",
			identitySources{ca: 1, spiffe: map[string]identityInfo{"node-2": spire(now.Add(365 * 24 * time.Hour))}},
			map[string]string{"root/node-2": "ok", "root/": "fail", "ca/": "fail"}},
		{"no agent said: as before, the ConfigMap is required and a missing CA warns",
			identitySources{spiffe: map[string]identityInfo{}},
			map[string]string{"root/": "fail", "ca/": "warn"}},
		// SPIRE's roots live a day by default (ca_ttl 24h) and rotate:
		// judged by the newest, an old one expiring beside it is normal.
		{"SPIRE roots: short-lived, rotating, rotation stopped, expired, missing",
			identitySources{spiffe: map[string]identityInfo{
				"node-1": spire(now.Add(20 * time.Hour)),
				"node-2": spire(now.Add(time.Hour), now.Add(13*time.Hour)),
				"node-3": spire(now.Add(time.Hour)),
				"node-4": spire(now.Add(-time.Minute)),
				"node-5": {Source: sourceSPIFFE, RootsError: "no Workload API update yet"},
				"node-6": spire(),
			}},
			map[string]string{"root/node-1": "ok", "root/node-2": "ok", "root/node-3": "warn", "root/node-4": "fail",
				"root/node-5": "fail", "root/node-6": "fail", "ca/": "ok"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client := fake.NewClientset()
			cl := &cluster.Cluster{Client: client, Namespace: cluster.DefaultNamespace}
			ck := &checker{}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			checkRoots(ctx, cl, ck, tt.src)
			checkCAs(ctx, cl, ck, tt.src)
			got := map[string]string{}
			for _, f := range ck.out {
				got[f.Check+"/"+f.Node] = f.Status
				t.Logf("%s %s %s: %s", f.Status, f.Check, f.Node, f.Message)
			}
			for k, w := range tt.want {
				if got[k] != w {
					t.Errorf("%s: %q, want %q", k, got[k], w)
				}
			}
			for k := range got {
				if _, ok := tt.want[k]; !ok {
					t.Errorf("unexpected finding %s: %s", k, got[k])
				}
			}
		})
	}
}
