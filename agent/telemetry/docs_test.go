package telemetry

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nodemesh/nodemesh/agent/admin"
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

// istioLabelTable returns docs/operations.md's table of Istio labels: the
// backquoted names of each row's first cell, mapped to the backquoted
// values of its second.
func istioLabelTable(t *testing.T, doc string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	in := false
	tick := regexp.MustCompile("`([^`]+)`")
	for line := range strings.SplitSeq(doc, "\n") {
		if strings.HasPrefix(line, "| Istio label |") {
			in = true
			continue
		}
		if !in || strings.HasPrefix(line, "|---") {
			continue
		}
		if !strings.HasPrefix(line, "|") {
			break
		}
		cells := strings.Split(line, "|")
		if len(cells) < 4 {
			t.Fatalf("docs/operations.md: malformed Istio label row %q", line)
		}
		var values []string
		for _, m := range tick.FindAllStringSubmatch(cells[2], -1) {
			values = append(values, m[1])
		}
		slices.Sort(values)
		for _, m := range tick.FindAllStringSubmatch(cells[1], -1) {
			out[m[1]] = values
		}
	}
	if len(out) == 0 {
		t.Fatal("docs/operations.md has no \"| Istio label |\" table")
	}
	return out
}

// TestDocumentedIstioLabels reads the Istio label table of
// docs/operations.md against the labels of the istio_tcp_* metrics, both
// ways, and the values documented for the labels with a fixed set against
// the values the code emits.
func TestDocumentedIstioLabels(t *testing.T) {
	b, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	table := istioLabelTable(t, string(b))
	var documented []string
	for l := range table {
		documented = append(documented, l)
	}
	slices.Sort(documented)
	code := slices.Sorted(slices.Values(admin.ConnLabelNames))
	if !slices.Equal(documented, code) {
		t.Errorf("docs/operations.md documents the Istio labels %q, the code exports %q", documented, code)
	}
	flags := []string{admin.FlagsNone}
	for _, r := range proxy.RefusalReasons {
		if f := ResponseFlags(r); !slices.Contains(flags, f) {
			flags = append(flags, f)
		}
	}
	for label, values := range map[string][]string{
		"response_flags":             flags,
		"reporter":                   {admin.ReporterSource, admin.ReporterDestination},
		"connection_security_policy": {admin.SecurityMutualTLS, admin.SecurityNone},
		"request_protocol":           {admin.ProtocolTCP},
	} {
		slices.Sort(values)
		if got := table[label]; !slices.Equal(got, values) {
			t.Errorf("docs/operations.md: %s values %q, the code emits %q", label, got, values)
		}
	}
}
