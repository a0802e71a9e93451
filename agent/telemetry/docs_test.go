package telemetry

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nodemesh/nodemesh/agent/proxy"
)

// docLabelValues returns the backquoted values in the meaning column of
// the metrics table row of docs/operations.md that documents metric (other
// metric names in that cell are skipped).
func docLabelValues(t *testing.T, doc, metric string) []string {
	t.Helper()
	for line := range strings.SplitSeq(doc, "\n") {
		if !strings.HasPrefix(line, "| `"+metric) {
			continue
		}
		cells := strings.Split(line, "|")
		if len(cells) < 4 {
			t.Fatalf("docs/operations.md: malformed row for %s: %q", metric, line)
		}
		var out []string
		for _, m := range regexp.MustCompile("`([^`]+)`").FindAllStringSubmatch(cells[3], -1) {
			if !strings.Contains(m[1], "_total") && !strings.Contains(m[1], "_seconds") {
				out = append(out, m[1])
			}
		}
		slices.Sort(out)
		return out
	}
	t.Fatalf("docs/operations.md has no row for %s", metric)
	return nil
}

// TestDocumentedLabelValues reads the metrics table of docs/operations.md
// against every label value the code can emit, both ways: a value the code
// emits but the docs do not list (or the reverse) fails, so an alert
// written from the docs can fire.
func TestDocumentedLabelValues(t *testing.T) {
	b, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	denied, outcomes := []string{}, []string{SetupOK}
	for _, r := range proxy.RefusalReasons {
		if label, ok := DeniedLabel(r); ok {
			if !slices.Contains(denied, label) {
				denied = append(denied, label)
			}
		} else {
			outcomes = append(outcomes, SetupOutcome(r))
		}
	}
	var captures []string
	for _, s := range CaptureStatuses {
		captures = append(captures, string(s))
	}
	for _, tc := range []struct {
		metric string
		code   []string
	}{
		{"nodemesh_connections_denied_total", denied},
		{"nodemesh_connection_setup_seconds", outcomes},
		{"nodemesh_capture_status", captures},
	} {
		slices.Sort(tc.code)
		if got := docLabelValues(t, doc, tc.metric); !slices.Equal(got, tc.code) {
			t.Errorf("%s: docs/operations.md lists %q, the code emits %q", tc.metric, got, tc.code)
		}
	}
}
