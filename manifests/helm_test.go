package manifests_test

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	"helm.sh/helm/v3/pkg/strvals"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/manifests"
)

// helmChart is the Helm chart, equivalent to the kustomize install.
const helmChart = "helm/nodemesh"

// helmOnlyLabels are the labels the chart adds to every object's metadata
// and the kustomize install does not: Helm's conventional ones. Nothing
// else may differ between the two renderings.
var helmOnlyLabels = []string{
	"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version",
}

// labKubeVersion is the lab API server's version (lab/apiserver).
const labKubeVersion = "v1.34.2"

// renderChart renders the chart as `helm install --namespace namespace`
// would, with Helm's own library: values coalesced with values.yaml and
// validated against values.schema.json, templates rendered by Helm's engine,
// the CRDs of crds/ first and everything in Helm's install order.
func renderChart(namespace string, values map[string]any) ([]*unstructured.Unstructured, error) {
	chrt, err := loader.Load(helmChart)
	if err != nil {
		return nil, fmt.Errorf("loading chart %s: %w", helmChart, err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	kv, err := chartutil.ParseKubeVersion(labKubeVersion)
	if err != nil {
		return nil, err
	}
	caps.KubeVersion = *kv
	if !chartutil.IsCompatibleRange(chrt.Metadata.KubeVersion, kv.String()) {
		return nil, fmt.Errorf("chart requires Kubernetes %s, not %s", chrt.Metadata.KubeVersion, kv)
	}
	opts := chartutil.ReleaseOptions{Name: "nodemesh", Namespace: namespace, Revision: 1, IsInstall: true}
	vals, err := chartutil.ToRenderValues(chrt, values, opts, caps)
	if err != nil {
		return nil, fmt.Errorf("values: %w", err)
	}
	files, err := engine.Render(chrt, vals)
	if err != nil {
		return nil, fmt.Errorf("rendering chart: %w", err)
	}
	hooks, rendered, err := releaseutil.SortManifests(files, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("sorting rendered manifests: %w", err)
	}
	if len(hooks) > 0 {
		return nil, fmt.Errorf("the chart has %d hooks; the kustomize install has none", len(hooks))
	}
	var docs []string
	for _, crd := range chrt.CRDObjects() {
		docs = append(docs, string(crd.File.Data))
	}
	for _, m := range rendered {
		docs = append(docs, m.Content)
	}
	var out []*unstructured.Unstructured
	for _, d := range docs {
		for _, doc := range releaseutil.SplitManifests(d) {
			var obj map[string]any
			if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
				return nil, fmt.Errorf("parsing rendered manifest: %w\n%s", err, doc)
			}
			if len(obj) > 0 {
				out = append(out, &unstructured.Unstructured{Object: obj})
			}
		}
	}
	return out, nil
}

func mustRenderChart(t *testing.T, values map[string]any) []*unstructured.Unstructured {
	t.Helper()
	objs, err := renderChart(ns, values)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// setValues builds chart values from helm's --set syntax; an argument
// prefixed "string:" is taken as --set-string.
func setValues(t *testing.T, sets ...string) map[string]any {
	t.Helper()
	v := map[string]any{}
	for _, s := range sets {
		parse := strvals.ParseInto
		if rest, ok := strings.CutPrefix(s, "string:"); ok {
			s, parse = rest, strvals.ParseIntoString
		}
		if err := parse(s, v); err != nil {
			t.Fatalf("--set %s: %v", s, err)
		}
	}
	return v
}

// comparable returns a rendered object keyed and normalised for comparison:
// the Helm-only labels dropped, numbers as JSON numbers.
func comparable(t *testing.T, o *unstructured.Unstructured) (string, map[string]any) {
	t.Helper()
	b, err := json.Marshal(o.Object)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	u := unstructured.Unstructured{Object: m}
	if labels := u.GetLabels(); labels != nil {
		for _, l := range helmOnlyLabels {
			delete(labels, l)
		}
		u.SetLabels(labels)
	}
	return key(o.GetKind(), o.GetNamespace(), o.GetName()), u.Object
}

// diffRenderings reports every object only one side has and every
// difference in the objects both have.
func diffRenderings(t *testing.T, kustomize, helm []*unstructured.Unstructured) {
	t.Helper()
	index := func(objs []*unstructured.Unstructured) map[string]map[string]any {
		out := map[string]map[string]any{}
		for _, o := range objs {
			k, m := comparable(t, o)
			if _, dup := out[k]; dup {
				t.Errorf("%s rendered twice", k)
			}
			out[k] = m
		}
		return out
	}
	k, h := index(kustomize), index(helm)
	for _, name := range slices.Sorted(maps.Keys(k)) {
		hm, ok := h[name]
		if !ok {
			t.Errorf("%s: in the kustomize install, not in the Helm chart's", name)
			continue
		}
		if d := cmp.Diff(k[name], hm); d != "" {
			t.Errorf("%s differs (-kustomize +helm):\n%s", name, d)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(h)) {
		if _, ok := k[name]; !ok {
			t.Errorf("%s: in the Helm chart's install, not in the kustomize one", name)
		}
	}
}

// TestHelmMatchesKustomize: the chart with its default values installs the
// same objects as `kubectl apply -k manifests/` (every field, the Helm-only
// labels aside) except the Namespace, which `helm install` needs to exist
// beforehand (namespace.create renders it, identical); with the
// observability extras switched on it adds exactly manifests/observability.
func TestHelmMatchesKustomize(t *testing.T) {
	def := render(t, ".")
	var noNS []*unstructured.Unstructured
	for _, o := range def.objs {
		if o.GetKind() != "Namespace" {
			noNS = append(noNS, o)
		}
	}
	if len(noNS) != len(def.objs)-1 {
		t.Fatalf("the kustomize install renders %d Namespaces, want 1", len(def.objs)-len(noNS))
	}
	t.Run("defaults", func(t *testing.T) {
		diffRenderings(t, noNS, mustRenderChart(t, nil))
	})
	t.Run("namespace", func(t *testing.T) {
		diffRenderings(t, def.objs, mustRenderChart(t, setValues(t, "namespace.create=true")))
	})
	t.Run("observability", func(t *testing.T) {
		obs, err := manifests.Render(observability)
		if err != nil {
			t.Fatal(err)
		}
		diffRenderings(t, append(slices.Clone(def.objs), obs...), mustRenderChart(t, setValues(t,
			"namespace.create=true", "observability.podMonitor.enabled=true",
			"observability.prometheusRule.enabled=true", "observability.dashboard.enabled=true")))
	})
	// The chart's copies of files kept in the kustomize tree: the rendered
	// objects are compared above; these are compared byte for byte so a
	// comment fixed on one side is fixed on the other.
	for chartFile, kFile := range map[string]string{
		"crds/security.nodemesh.io_authorizationpolicies.yaml": "crds/security.nodemesh.io_authorizationpolicies.yaml",
		"crds/security.nodemesh.io_peerauthentications.yaml":   "crds/security.nodemesh.io_peerauthentications.yaml",
		"crds/traffic.nodemesh.io_trafficpolicies.yaml":        "crds/traffic.nodemesh.io_trafficpolicies.yaml",
		"files/nodemesh-dashboard.json":                        dashboardFile,
	} {
		a, errA := os.ReadFile(filepath.Join(helmChart, chartFile))
		b, errB := os.ReadFile(kFile)
		if errA != nil || errB != nil {
			t.Fatalf("%v %v", errA, errB)
		}
		if string(a) != string(b) {
			t.Errorf("%s/%s differs from %s: copy it again", helmChart, chartFile, kFile)
		}
	}
}

// TestHelmInstallChecks runs the kustomize install's checks (agent, CA,
// RBAC, admission) on the chart's renderings, defaults and otherwise.
func TestHelmInstallChecks(t *testing.T) {
	for name, vals := range map[string]map[string]any{
		"defaults": nil,
		"rollout": setValues(t, "agent.nodeSelector.nodemesh\\.io/agent=enabled", "trustDomain=prod.example.org",
			"agent.metricsScrapers={monitoring/prometheus}", "ca.providedRoot=true"),
	} {
		t.Run(name, func(t *testing.T) {
			in := decode(t, "helm "+name, mustRenderChart(t, vals))
			checkAgent(t, in)
			checkCA(t, in)
			checkRBAC(t, in)
			checkLeaseAdmission(t, in)
		})
	}
}

// TestHelmValues: each value lands in the field it is for.
func TestHelmValues(t *testing.T) {
	agentOf := func(in install) corev1.PodSpec {
		return get[*appsv1.DaemonSet](t, in, "DaemonSet", ns, "nodemesh-agent").Spec.Template.Spec
	}
	caOf := func(in install) *appsv1.Deployment {
		return get[*appsv1.Deployment](t, in, "Deployment", ns, "nodemesh-ca")
	}
	def := decode(t, "helm defaults", mustRenderChart(t, nil))
	defAgent, defCA := agentOf(def), caOf(def)

	in := decode(t, "helm values", mustRenderChart(t, setValues(t,
		"trustDomain=prod.example.org",
		"clusterDomain=corp.internal",
		"clusterID=east-1",
		"logLevel=debug",
		"accessLog=true",
		// Node-by-node rollout: the documented label, added to the default.
		"agent.nodeSelector.nodemesh\\.io/agent=enabled",
		"agent.tolerations[0].key=dedicated",
		"agent.tolerations[0].operator=Equal",
		"agent.tolerations[0].value=mesh",
		"agent.tolerations[0].effect=NoSchedule",
		"agent.image.repository=registry.example.com/nodemesh-agent",
		"agent.image.tag=0.2.0-rc.1",
		"agent.image.pullPolicy=Always",
		"agent.resources.requests.cpu=250m",
		"agent.resources.limits.memory=2Gi",
		"agent.maxUnavailable=5%",
		"agent.metricsScrapers={monitoring/prometheus,obs/vm-agent}",
		"string:agent.podAnnotations.prometheus\\.io/scrape=true",
		"ca.image.repository=registry.example.com:5000/nodemesh-ca",
		"ca.image.digest=sha256:"+strings.Repeat("ab", 32),
		"ca.image.pullPolicy=Never",
		"ca.replicas=3",
		"ca.providedRoot=true",
		"ca.resources.limits.memory=512Mi",
	)))
	cm := get[*corev1.ConfigMap](t, in, "ConfigMap", ns, "nodemesh-config")
	if want := map[string]string{"trust-domain": "prod.example.org", "cluster-domain": "corp.internal", "cluster-id": "east-1", "log-level": "debug", "access-log": "true"}; !maps.Equal(cm.Data, want) {
		t.Errorf("settings %v, want %v", cm.Data, want)
	}
	a := agentOf(in)
	if want := map[string]string{"kubernetes.io/os": "linux", "nodemesh.io/agent": "enabled"}; !maps.Equal(a.NodeSelector, want) {
		t.Errorf("agent nodeSelector %v, want %v", a.NodeSelector, want)
	}
	if !maps.Equal(defAgent.NodeSelector, map[string]string{"kubernetes.io/os": "linux"}) {
		t.Errorf("default agent nodeSelector %v", defAgent.NodeSelector)
	}
	if want := []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "mesh", Effect: corev1.TaintEffectNoSchedule}}; !slices.Equal(a.Tolerations, want) {
		t.Errorf("agent tolerations %v, want %v", a.Tolerations, want)
	}
	ac := a.Containers[0]
	if ac.Image != "registry.example.com/nodemesh-agent:0.2.0-rc.1" || ac.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("agent image %s pull %s", ac.Image, ac.ImagePullPolicy)
	}
	if defAgent.Containers[0].Image != "ghcr.io/nodemesh/nodemesh-agent:0.1.0" {
		t.Errorf("default agent image %s, want the chart's appVersion", defAgent.Containers[0].Image)
	}
	if ac.Resources.Requests.Cpu().String() != "250m" || ac.Resources.Limits.Memory().String() != "2Gi" ||
		ac.Resources.Requests.Memory().String() != "128Mi" {
		t.Errorf("agent resources %v (requests memory is the default 128Mi)", ac.Resources)
	}
	if s, _ := flag(ac.Args, "metrics-scrapers"); s != "monitoring/prometheus,obs/vm-agent" {
		t.Errorf("agent --metrics-scrapers=%q", s)
	}
	if _, ok := flag(defAgent.Containers[0].Args, "metrics-scrapers"); ok {
		t.Error("default agent has --metrics-scrapers")
	}
	ds := get[*appsv1.DaemonSet](t, in, "DaemonSet", ns, "nodemesh-agent")
	if ru := ds.Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.String() != "5%" ||
		ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 0 {
		t.Errorf("agent update strategy %+v, want maxUnavailable 5%%, maxSurge 0", ds.Spec.UpdateStrategy)
	}
	if ds.Spec.Template.Annotations["prometheus.io/scrape"] != "true" || ds.Spec.Template.Annotations["kubectl.kubernetes.io/default-container"] != "agent" {
		t.Errorf("agent pod annotations %v", ds.Spec.Template.Annotations)
	}

	ca := caOf(in)
	cc := ca.Spec.Template.Spec.Containers[0]
	if cc.Image != "registry.example.com:5000/nodemesh-ca@sha256:"+strings.Repeat("ab", 32) || cc.ImagePullPolicy != corev1.PullNever {
		t.Errorf("CA image %s pull %s", cc.Image, cc.ImagePullPolicy)
	}
	if *ca.Spec.Replicas != 3 || *defCA.Spec.Replicas != 2 {
		t.Errorf("CA replicas %d (default %d)", *ca.Spec.Replicas, *defCA.Spec.Replicas)
	}
	if s, _ := flag(cc.Args, "ca-secret"); s != "nodemesh-ca-provided" {
		t.Errorf("CA --ca-secret=%q with ca.providedRoot", s)
	}
	if _, ok := flag(cc.Args, "root-secret"); ok {
		t.Error("CA has both --root-secret and --ca-secret")
	}
	if cc.Resources.Limits.Memory().String() != "512Mi" {
		t.Errorf("CA resources %v", cc.Resources)
	}
	// The production overlay's settings are reachable with values.
	prod := render(t, "overlays/production")
	pc := get[*appsv1.DaemonSet](t, prod, "DaemonSet", ns, "nodemesh-agent").Spec.Template.Spec.Containers[0]
	if pc.Resources.Limits.Memory().Cmp(*ac.Resources.Limits.Memory()) != 0 {
		t.Errorf("production agent memory limit %v, the values above set %v", pc.Resources.Limits.Memory(), ac.Resources.Limits.Memory())
	}
}

// TestHelmRejectsBadValues: invalid values fail before anything renders,
// with an error naming the value.
func TestHelmRejectsBadValues(t *testing.T) {
	for _, tc := range []struct {
		name      string
		namespace string
		set       []string
		want      []string // substrings of the error
	}{
		{"empty trust domain", ns, []string{"trustDomain="}, []string{"trustDomain", "minLength"}},
		{"trust domain with a scheme", ns, []string{"trustDomain=spiffe://cluster.local"}, []string{"trustDomain", "does not match pattern"}},
		{"upper-case trust domain", ns, []string{"trustDomain=Cluster.Local"}, []string{"trustDomain"}},
		{"tag with a colon", ns, []string{"agent.image.tag=0.1:latest"}, []string{"agent/image/tag", "does not match pattern"}},
		{"tag starting with a dot", ns, []string{"ca.image.tag=.1"}, []string{"ca/image/tag"}},
		{"repository with a tag", ns, []string{"agent.image.repository=ghcr.io/nodemesh/nodemesh-agent:0.1.0"}, []string{"agent/image/repository"}},
		{"short digest", ns, []string{"ca.image.digest=sha256:abc"}, []string{"ca/image/digest"}},
		{"pull policy", ns, []string{"agent.image.pullPolicy=Sometimes"}, []string{"agent/image/pullPolicy"}},
		{"misspelt value", ns, []string{"agent.nodeSelecter.nodemesh\\.io/agent=enabled"}, []string{"nodeSelecter"}},
		{"non-string node label", ns, []string{"agent.nodeSelector.disk=1"}, []string{"agent/nodeSelector/disk", "string"}},
		{"bad quantity", ns, []string{"agent.resources.requests.cpu=lots"}, []string{"agent/resources/requests/cpu"}},
		{"scraper without namespace", ns, []string{"agent.metricsScrapers={prometheus}"}, []string{"agent/metricsScrapers/0"}},
		{"no CA", ns, []string{"ca.replicas=0"}, []string{"ca/replicas"}},
		{"no agent may be replaced", ns, []string{"agent.maxUnavailable=0"}, []string{"agent/maxUnavailable"}},
		{"max unavailable not a percentage", ns, []string{"agent.maxUnavailable=lots"}, []string{"agent/maxUnavailable"}},
		{"max unavailable over 100%", ns, []string{"agent.maxUnavailable=150%"}, []string{"agent/maxUnavailable"}},
		{"log level", ns, []string{"logLevel=verbose"}, []string{"logLevel"}},
		{"cluster domain with a trailing dot", ns, []string{"clusterDomain=cluster.local."}, []string{"clusterDomain", "does not match pattern"}},
		{"empty cluster ID", ns, []string{"clusterID="}, []string{"clusterID", "minLength"}},
		{"another namespace", "kube-system", nil, []string{"nodemesh-system", "--namespace nodemesh-system"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := renderChart(tc.namespace, setValues(t, tc.set...))
			if err == nil {
				t.Fatalf("%v rendered", tc.set)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
		})
	}
}

// TestHelmLint: the chart passes Helm's own linter (chart metadata,
// templates, schema), as `helm lint --strict` would run it.
func TestHelmLint(t *testing.T) {
	kv, err := chartutil.ParseKubeVersion(labKubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	for name, vals := range map[string]map[string]any{
		"defaults": nil,
		"everything": setValues(t, "namespace.create=true", "observability.podMonitor.enabled=true",
			"observability.prometheusRule.enabled=true", "observability.dashboard.enabled=true"),
	} {
		l := lint.AllWithKubeVersion(helmChart, vals, ns, kv)
		for _, m := range l.Messages {
			// Info: the chart has no icon, which only a chart repository shows.
			if m.Severity > support.InfoSev {
				t.Errorf("%s: helm lint: %v", name, m)
			}
		}
	}
}

// TestLabHelmInstall: the chart's renderings pass a server-side dry-run
// apply against the lab's real kube-apiserver, as the kustomize installs do
// in TestLabInstall: the defaults (with the Namespace, as namespace.create
// renders it), and non-default values (node-by-node rollout selector,
// another trust domain, scrapers, provided root, another image).
func TestLabHelmInstall(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	renders := map[string][]*unstructured.Unstructured{
		"defaults": mustRenderChart(t, setValues(t, "namespace.create=true")),
		"values": mustRenderChart(t, setValues(t, "namespace.create=true",
			"agent.nodeSelector.nodemesh\\.io/agent=enabled", "trustDomain=prod.example.org",
			"agent.metricsScrapers={monitoring/prometheus}", "ca.providedRoot=true", "ca.replicas=3",
			"agent.image.repository=registry.example.com/nodemesh-agent", "agent.image.tag=0.2.0",
			"agent.resources.limits.memory=2Gi")),
	}
	c := startCluster(ctx, t)
	names := slices.Sorted(maps.Keys(renders))
	// Cluster-scoped objects first (dry run), then the Namespace and the
	// CRDs for real, then every namespaced object (dry run).
	for _, name := range names {
		for _, o := range renders[name] {
			if clusterScoped(o) {
				if err := c.apply(ctx, o, true); err != nil {
					t.Errorf("helm %s: %v", name, err)
				}
			}
		}
	}
	var crds []string
	for _, o := range renders["defaults"] {
		if o.GetKind() == "Namespace" || o.GetKind() == "CustomResourceDefinition" {
			if err := c.apply(ctx, o, false); err != nil {
				t.Fatal(err)
			}
		}
		if o.GetKind() == "CustomResourceDefinition" {
			crds = append(crds, o.GetName())
		}
	}
	if len(crds) != 3 {
		t.Errorf("the chart installs CRDs %v, want 3", crds)
	}
	for _, name := range crds {
		waitEstablished(ctx, t, c.dyn, name)
	}
	c.mapper.Reset()
	n := 0
	for _, name := range names {
		for _, o := range renders[name] {
			if !clusterScoped(o) {
				n++
				if err := c.apply(ctx, o, true); err != nil {
					t.Errorf("helm %s: %v", name, err)
				}
			}
		}
	}
	if n < 20 {
		t.Errorf("dry-ran only %d namespaced objects", n)
	}
	if t.Failed() {
		t.FailNow()
	}
	// The non-default rendering for real (no controllers run: nothing
	// starts), then the pods its workloads would create pass admission
	// (Pod Security; their service accounts exist).
	for _, o := range renders["values"] {
		if err := c.apply(ctx, o, false); err != nil {
			t.Fatal(err)
		}
	}
	checkPodSecurity(ctx, t, c, renders["values"])
}
