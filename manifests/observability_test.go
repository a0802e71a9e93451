package manifests_test

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/prometheus/promql/parser"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/nodemesh/nodemesh/agent/admin"
	"github.com/nodemesh/nodemesh/agent/exposure"
	"github.com/nodemesh/nodemesh/agent/version"
	"github.com/nodemesh/nodemesh/identity/svid"
	"github.com/nodemesh/nodemesh/manifests"
	"github.com/nodemesh/nodemesh/redirect"
)

const (
	monitoringGroup = "monitoring.coreos.com"
	observability   = "observability"
	dashboardFile   = "observability/nodemesh-dashboard.json"
)

// targetLabels are the labels Prometheus adds to every series it scrapes
// from an agent with the PodMonitor (job from jobLabel, node from the
// relabeling, and the operator's usual target labels).
var targetLabels = []string{"job", "instance", "namespace", "pod", "container", "endpoint", "node"}

// external are series the rules use that come from elsewhere: Prometheus
// itself and kube-state-metrics (DaemonSet and Deployment status).
var external = map[string][]string{
	"up":                                 nil,
	"kube_daemonset_status_number_ready": {"daemonset"},
	"kube_daemonset_status_desired_number_scheduled": {"daemonset"},
	"kube_deployment_status_replicas_available":      {"deployment"},
}

// agentMetrics returns every metric name the agent exports and its label
// names, from the descriptors of the collectors the agent registers (the
// same constructors it calls). A histogram's _bucket, _sum and _count
// series are included.
func agentMetrics(t *testing.T) map[string][]string {
	t.Helper()
	reg := prometheus.NewRegistry()
	if _, err := admin.NewMetrics(reg, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := exposure.New(exposure.Config{Node: "n", Registerer: reg}); err != nil {
		t.Fatal(err)
	}
	// The admin server's own counters (refused metrics and readiness requests).
	if _, err := admin.New(admin.Config{Level: new(slog.LevelVar), Registerer: reg}); err != nil {
		t.Fatal(err)
	}
	var capture *redirect.Capture
	var svids *svid.Manager
	cs := []prometheus.Collector{
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		capture.Collector(), svids.Collector(), version.Collector("agent"),
		// Registered by the agent itself (its state store's version).
		prometheus.NewGauge(prometheus.GaugeOpts{Name: "nodemesh_state_version", Help: "-"}),
	}
	ch := make(chan *prometheus.Desc, 64)
	go func() {
		for _, c := range cs {
			c.Describe(ch)
		}
		rch := make(chan *prometheus.Desc, 64)
		go func() { reg.Describe(rch); close(rch) }()
		for d := range rch {
			ch <- d
		}
		close(ch)
	}()
	nameRE := regexp.MustCompile(`fqName: "([^"]+)"`)
	constRE := regexp.MustCompile(`constLabels: \{([^}]*)\}`)
	varRE := regexp.MustCompile(`variableLabels: \{([^}]*)\}`)
	out := map[string][]string{}
	for d := range ch {
		s := d.String()
		m := nameRE.FindStringSubmatch(s)
		if m == nil {
			t.Fatalf("cannot read a metric name from %s", s)
		}
		var labels []string
		if c := constRE.FindStringSubmatch(s); c != nil && c[1] != "" {
			for _, kv := range strings.Split(c[1], ",") {
				labels = append(labels, strings.SplitN(kv, "=", 2)[0])
			}
		}
		if v := varRE.FindStringSubmatch(s); v != nil && v[1] != "" {
			for _, l := range strings.Split(v[1], ",") {
				labels = append(labels, strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")"))
			}
		}
		out[m[1]] = labels
		out[m[1]+"_bucket"] = append(slices.Clone(labels), "le")
		out[m[1]+"_sum"] = labels
		out[m[1]+"_count"] = labels
	}
	for _, must := range []string{"istio_tcp_connections_opened_total", "nodemesh_capture_status", "process_cpu_seconds_total", "nodemesh_build_info", "nodemesh_svid_expiry_timestamp_seconds"} {
		if _, ok := out[must]; !ok {
			t.Fatalf("the agent's metrics lack %s: the descriptor parsing broke", must)
		}
	}
	return out
}

// grafanaVars replaces the dashboard's variables with values PromQL parses.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$node", ".*")

// TestObservability checks what manifests/observability ships: the
// kustomization renders a PodMonitor, a PrometheusRule and the dashboard's
// ConfigMap; the dashboard JSON parses; every query of the dashboard and
// every alert expression parses with Prometheus's own parser and selects
// only metrics the agent exports (or the few external ones listed above)
// with labels those metrics carry.
func TestObservability(t *testing.T) {
	known := agentMetrics(t)
	for name, labels := range external {
		known[name] = labels
	}
	objs, err := manifests.Render(observability)
	if err != nil {
		t.Fatal(err)
	}
	byKind := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		byKind[o.GetKind()] = o
		if o.GetNamespace() != ns {
			t.Errorf("%s %s in namespace %q, want %s", o.GetKind(), o.GetName(), o.GetNamespace(), ns)
		}
	}
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	// The ConfigMap carries the file as it is, labelled for Grafana's sidecar.
	cm := byKind["ConfigMap"]
	if cm == nil || cm.GetLabels()["grafana_dashboard"] != "1" {
		t.Fatalf("no dashboard ConfigMap labelled grafana_dashboard=1: %v", cm)
	}
	if data, _, _ := unstructured.NestedString(cm.Object, "data", "nodemesh-dashboard.json"); data != string(raw) {
		t.Error("the ConfigMap's dashboard differs from nodemesh-dashboard.json")
	}

	// PodMonitor: selects the agent pods' metrics port.
	pm := byKind["PodMonitor"]
	if pm == nil {
		t.Fatal("no PodMonitor rendered")
	}
	if sel, _, _ := unstructured.NestedString(pm.Object, "spec", "selector", "matchLabels", "app.kubernetes.io/name"); sel != "nodemesh-agent" {
		t.Errorf("PodMonitor selects app.kubernetes.io/name=%q", sel)
	}
	eps, _, _ := unstructured.NestedSlice(pm.Object, "spec", "podMetricsEndpoints")
	if len(eps) != 1 || eps[0].(map[string]any)["port"] != "metrics" || eps[0].(map[string]any)["path"] != "/metrics" {
		t.Errorf("PodMonitor endpoints %v, want port metrics, path /metrics", eps)
	}

	// The dashboard.
	var dash struct {
		Title  string           `json:"title"`
		UID    string           `json:"uid"`
		Panels []map[string]any `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Errorf("dashboard without title or uid")
	}
	var exprs []string
	var walk func([]map[string]any)
	walk = func(ps []map[string]any) {
		for _, p := range ps {
			if ts, ok := p["targets"].([]any); ok {
				for _, tg := range ts {
					if e, ok := tg.(map[string]any)["expr"].(string); ok {
						exprs = append(exprs, e)
					}
				}
			}
			if sub, ok := p["panels"].([]any); ok {
				var m []map[string]any
				for _, s := range sub {
					m = append(m, s.(map[string]any))
				}
				walk(m)
			}
		}
	}
	walk(dash.Panels)
	if len(exprs) < 15 {
		t.Errorf("the dashboard has only %d queries", len(exprs))
	}
	// The sections the issue asks for.
	for _, want := range []string{"istio_tcp_", "nodemesh_connections_denied_total", "nodemesh_capture_status", "nodemesh_svid_expiry_timestamp_seconds",
		"nodemesh_root_expiry_timestamp_seconds", "process_cpu_seconds_total", "process_resident_memory_bytes"} {
		if !slices.ContainsFunc(exprs, func(e string) bool { return strings.Contains(e, want) }) {
			t.Errorf("no dashboard query uses %s", want)
		}
	}
	for _, e := range exprs {
		checkQuery(t, "dashboard", grafanaVars.Replace(e), known)
	}

	// The rules.
	pr := byKind["PrometheusRule"]
	if pr == nil {
		t.Fatal("no PrometheusRule rendered")
	}
	groups, _, _ := unstructured.NestedSlice(pr.Object, "spec", "groups")
	alerts := 0
	for _, g := range groups {
		rules, _ := g.(map[string]any)["rules"].([]any)
		for _, r := range rules {
			rm := r.(map[string]any)
			name, _ := rm["alert"].(string)
			expr, _ := rm["expr"].(string)
			if name == "" || expr == "" {
				t.Errorf("rule %v: want alert and expr", rm)
				continue
			}
			alerts++
			checkQuery(t, "alert "+name, expr, known)
			if ann, _ := rm["annotations"].(map[string]any); ann["summary"] == nil || ann["description"] == nil {
				t.Errorf("alert %s: want summary and description annotations", name)
			}
			if lbl, _ := rm["labels"].(map[string]any); lbl["severity"] == nil {
				t.Errorf("alert %s: want a severity label", name)
			}
		}
	}
	if alerts < 8 {
		t.Errorf("only %d alerts", alerts)
	}
}

// checkQuery parses expr and checks its selectors and groupings against
// known (metric name -> label names).
func checkQuery(t *testing.T, where, expr string, known map[string][]string) {
	t.Helper()
	e, err := parser.ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: %q does not parse: %v", where, expr, err)
		return
	}
	for _, err := range checkNode(e, known) {
		t.Errorf("%s: %q: %v", where, expr, err)
	}
}

// labelsOf returns the label names the series selected under n can carry.
func labelsOf(n parser.Node, known map[string][]string) []string {
	var out []string
	parser.Inspect(n, func(node parser.Node, _ []parser.Node) error {
		if vs, ok := node.(*parser.VectorSelector); ok {
			out = append(out, known[vs.Name]...)
			out = append(out, targetLabels...)
		}
		return nil
	})
	return out
}

func checkNode(root parser.Node, known map[string][]string) []error {
	var errs []error
	parser.Inspect(root, func(node parser.Node, _ []parser.Node) error {
		switch n := node.(type) {
		case *parser.VectorSelector:
			labels, ok := known[n.Name]
			if !ok {
				errs = append(errs, fmt.Errorf("metric %q is not exported by the agent", n.Name))
				return nil
			}
			for _, m := range n.LabelMatchers {
				if m.Name == "__name__" {
					continue
				}
				if !slices.Contains(labels, m.Name) && !slices.Contains(targetLabels, m.Name) {
					errs = append(errs, fmt.Errorf("%s has no label %q (it has %v)", n.Name, m.Name, labels))
				}
			}
		case *parser.AggregateExpr:
			have := labelsOf(n.Expr, known)
			for _, g := range n.Grouping {
				if !slices.Contains(have, g) {
					errs = append(errs, fmt.Errorf("%s by %q: no selected metric has that label", n.Op, g))
				}
			}
		case *parser.BinaryExpr:
			if n.VectorMatching != nil {
				have := append(labelsOf(n.LHS, known), labelsOf(n.RHS, known)...)
				for _, l := range n.VectorMatching.MatchingLabels {
					if !slices.Contains(have, l) {
						errs = append(errs, fmt.Errorf("matching on %q: no selected metric has that label", l))
					}
				}
			}
		}
		return nil
	})
	return errs
}
