package manifests_test

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestDocumentedMetrics keeps the metrics table of docs/operations.md in
// step with the agent's collectors, both ways: every documented metric and
// label exists, and every nodemesh_* and istio_* metric the agent exports
// is documented.
func TestDocumentedMetrics(t *testing.T) {
	known := agentMetrics(t)
	b, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	cellRE := regexp.MustCompile("`([a-z_:]+)(\\{([a-z_,]*)\\})?`")
	for line := range strings.SplitSeq(string(b), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		for _, m := range cellRE.FindAllStringSubmatch(cells[1], -1) {
			name := m[1]
			if !strings.HasPrefix(name, "nodemesh_") && !strings.HasPrefix(name, "istio_") {
				continue
			}
			documented[name] = true
			labels, ok := known[name]
			if !ok {
				t.Errorf("docs/operations.md documents %s, which the agent does not export", name)
				continue
			}
			if m[3] == "" {
				continue
			}
			for _, l := range strings.Split(m[3], ",") {
				if !slices.Contains(labels, l) {
					t.Errorf("docs/operations.md: %s has no label %q (it has %v)", name, l, labels)
				}
			}
		}
	}
	for name := range known {
		if !strings.HasPrefix(name, "nodemesh_") && !strings.HasPrefix(name, "istio_") {
			continue
		}
		if base, ok := strings.CutSuffix(name, "_bucket"); ok {
			if _, ok := known[base]; ok {
				continue // a series of base (see agentMetrics)
			}
		}
		if strings.HasSuffix(name, "_sum") || strings.HasSuffix(name, "_count") {
			if _, ok := known[strings.TrimSuffix(strings.TrimSuffix(name, "_sum"), "_count")+"_bucket"]; ok {
				continue
			}
		}
		if !documented[name] {
			t.Errorf("the agent exports %s, but docs/operations.md's metrics table does not list it", name)
		}
	}
}
