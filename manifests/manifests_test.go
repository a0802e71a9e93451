package manifests_test

import (
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/manifests"
)

// The installs a user can apply: the default (kubectl apply -k manifests/)
// and the overlays.
var installs = []string{".", "overlays/lab", "overlays/production", "overlays/cluster", "overlays/spire"}

// uninstall is the node cleanup applied when uninstalling.
const uninstall = "uninstall"

// meshPolicy holds the mesh-wide policy defaults, applied after the CRDs.
const meshPolicy = "mesh-policy"

const ns = "nodemesh-system"

// strictDecoder decodes the built-in kinds, refusing unknown and duplicate
// fields, so a misspelt field fails here instead of being dropped by the
// API server. (CRDs are checked by the API server in the lab test.)
var strictDecoder = serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()

// unstructuredKind reports whether kind stays unstructured: CRDs,
// nodemesh's custom resources and the Prometheus Operator's (checked by
// TestObservability), which client-go's scheme does not know.
func unstructuredKind(o *unstructured.Unstructured) bool {
	g := o.GroupVersionKind().Group
	return o.GetKind() == "CustomResourceDefinition" || g == v1alpha1.SchemeGroupVersion.Group || g == monitoringGroup
}

// TestEveryFileParses decodes every YAML document under manifests/ (the
// kustomizations and patches excepted, which kustomize checks) strictly
// into its Go type.
func TestEveryFileParses(t *testing.T) {
	n := 0
	err := filepath.WalkDir(".", func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".yaml") || filepath.Base(p) == "kustomization.yaml" {
			return err
		}
		if filepath.Base(filepath.Dir(p)) == "templates" && strings.HasPrefix(p, helmChart) {
			return nil // Helm templates: TestHelm* check what they render
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for i, doc := range splitYAML(t, b) {
			var u unstructured.Unstructured
			if err := yaml.UnmarshalStrict(doc, &u.Object); err != nil {
				t.Errorf("%s document %d: %v", p, i, err)
				continue
			}
			n++
			if u.GetKind() == "" || unstructuredKind(&u) {
				continue // a patch, or a kind checked by the API server
			}
			if _, _, err := strictDecoder.Decode(doc, nil, nil); err != nil {
				t.Errorf("%s document %d: %v", p, i, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 15 {
		t.Errorf("parsed only %d documents", n)
	}
}

func splitYAML(t *testing.T, b []byte) [][]byte {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufioReader(b))
	var out [][]byte
	for {
		doc, err := r.Read()
		if err != nil {
			break
		}
		if len(strings.TrimSpace(stripComments(string(doc)))) > 0 {
			out = append(out, doc)
		}
	}
	return out
}

func stripComments(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// install is one rendered kustomization, decoded.
type install struct {
	objs  []*unstructured.Unstructured
	typed map[string]runtime.Object // "Kind/namespace/name"
}

func key(kind, namespace, name string) string { return kind + "/" + namespace + "/" + name }

func render(t *testing.T, dir string) install {
	t.Helper()
	objs, err := manifests.Render(dir)
	if err != nil {
		t.Fatalf("rendering %s: %v", dir, err)
	}
	return decode(t, dir, objs)
}

// decode decodes a rendering (named dir in errors) strictly into Go types.
func decode(t *testing.T, dir string, objs []*unstructured.Unstructured) install {
	t.Helper()
	in := install{objs: objs, typed: map[string]runtime.Object{}}
	for _, o := range objs {
		b, err := yaml.Marshal(o.Object)
		if err != nil {
			t.Fatal(err)
		}
		var obj runtime.Object
		if unstructuredKind(o) {
			obj = o
		} else if obj, _, err = strictDecoder.Decode(b, nil, nil); err != nil {
			t.Errorf("%s: %s %s: %v", dir, o.GetKind(), o.GetName(), err)
			continue
		}
		k := key(o.GetKind(), o.GetNamespace(), o.GetName())
		if _, dup := in.typed[k]; dup {
			t.Errorf("%s: %s rendered twice", dir, k)
		}
		in.typed[k] = obj
	}
	return in
}

func get[T runtime.Object](t *testing.T, in install, kind, namespace, name string) T {
	t.Helper()
	o, ok := in.typed[key(kind, namespace, name)]
	if !ok {
		t.Fatalf("no %s %s/%s rendered", kind, namespace, name)
	}
	v, ok := o.(T)
	if !ok {
		t.Fatalf("%s %s/%s decoded as %T", kind, namespace, name, o)
	}
	return v
}

func TestInstallsRender(t *testing.T) {
	for _, dir := range installs {
		t.Run(dir, func(t *testing.T) {
			in := render(t, dir)
			for _, o := range in.objs {
				namespaced := !slices.Contains([]string{"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
					"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}, o.GetKind())
				if namespaced && o.GetNamespace() != ns {
					t.Errorf("%s %s in namespace %q, want %s", o.GetKind(), o.GetName(), o.GetNamespace(), ns)
				}
				if o.GetLabels()["app.kubernetes.io/part-of"] != "nodemesh" && o.GetKind() != "CustomResourceDefinition" {
					t.Errorf("%s %s lacks app.kubernetes.io/part-of=nodemesh (uninstall selects by it)", o.GetKind(), o.GetName())
				}
			}
			// The CRDs the agent watches are installed with it.
			for _, gvr := range []string{"authorizationpolicies", "peerauthentications"} {
				get[*unstructured.Unstructured](t, in, "CustomResourceDefinition", "", gvr+"."+v1alpha1.SchemeGroupVersion.Group)
			}
			checkAgent(t, in)
			checkCA(t, in)
			checkRBAC(t, in)
			checkLeaseAdmission(t, in)
		})
	}
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// checkEnvRefs: every $(VAR) in args is defined in env (the kubelet leaves
// an undefined reference in place, silently), and every configMapKeyRef
// names a key the settings ConfigMap has.
func checkEnvRefs(t *testing.T, in install, c corev1.Container) {
	t.Helper()
	defined := map[string]bool{}
	cm := get[*corev1.ConfigMap](t, in, "ConfigMap", ns, "nodemesh-config")
	for _, e := range c.Env {
		defined[e.Name] = true
		if r := e.ValueFrom; r != nil && r.ConfigMapKeyRef != nil {
			if r.ConfigMapKeyRef.Name != cm.Name {
				t.Errorf("%s: env %s from ConfigMap %s, want %s", c.Name, e.Name, r.ConfigMapKeyRef.Name, cm.Name)
			} else if _, ok := cm.Data[r.ConfigMapKeyRef.Key]; !ok {
				t.Errorf("%s: env %s from key %q, which %s lacks", c.Name, e.Name, r.ConfigMapKeyRef.Key, cm.Name)
			}
		}
	}
	for _, a := range append(slices.Clone(c.Command), c.Args...) {
		for _, m := range varRef.FindAllStringSubmatch(a, -1) {
			if !defined[m[1]] {
				t.Errorf("%s: argument %q refers to $(%s), which env does not define", c.Name, a, m[1])
			}
		}
	}
}

// flag returns the value of --name=value in args.
func flag(args []string, name string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

func checkAgent(t *testing.T, in install) {
	t.Helper()
	ds := get[*appsv1.DaemonSet](t, in, "DaemonSet", ns, "nodemesh-agent")
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || !spec.HostPID {
		t.Errorf("agent: hostNetwork %v hostPID %v, want both (node ports; netns discovery from /proc)", spec.HostNetwork, spec.HostPID)
	}
	if spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("agent: dnsPolicy %s, want ClusterFirstWithHostNet (resolve the CA's Service from the host network)", spec.DNSPolicy)
	}
	if spec.ServiceAccountName != "nodemesh-agent" {
		t.Errorf("agent: serviceAccountName %q", spec.ServiceAccountName)
	}
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 1 ||
		(ru.MaxSurge != nil && ru.MaxSurge.IntValue() != 0) {
		t.Errorf("agent: update strategy %+v, want RollingUpdate maxUnavailable 1, maxSurge 0", ds.Spec.UpdateStrategy)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("agent: %d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	checkEnvRefs(t, in, c)

	// Environment from the downward API.
	for name, path := range map[string]string{"NODE_NAME": "spec.nodeName", "POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"} {
		ok := false
		for _, e := range c.Env {
			if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == path {
				ok = true
			}
		}
		if !ok {
			t.Errorf("agent: env %s not from the downward API field %s", name, path)
		}
	}
	if v, _ := flag(c.Args, "node-name"); v != "$(NODE_NAME)" {
		t.Errorf("agent: --node-name=%q, want $(NODE_NAME)", v)
	}

	// Privileges: exactly these capabilities, nothing else.
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("agent: no securityContext.capabilities")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("agent: privileged; the capabilities must be the whole grant")
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("agent: drops %v, want [ALL]", sc.Capabilities.Drop)
	}
	var added []string
	for _, c := range sc.Capabilities.Add {
		added = append(added, string(c))
	}
	slices.Sort(added)
	if want := []string{"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}; !slices.Equal(added, want) {
		t.Errorf("agent: adds capabilities %v, want %v", added, want)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("agent: root filesystem is writable")
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("agent: seccomp %v, want RuntimeDefault", sc.SeccompProfile)
	}

	// Mounts: bpffs (pins), the host's cgroup hierarchy, the CA token.
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
		if _, ok := vols[m.Name]; !ok {
			t.Errorf("agent: mount %s of undefined volume %s", m.MountPath, m.Name)
		}
	}
	// Transparent delivery writes pod sysctls through the host's
	// /proc/sys/net (the container's /proc/sys is read-only).
	if m, ok := mounts[inpod.HostProcSysNet]; !ok || vols[m.Name].HostPath == nil || vols[m.Name].HostPath.Path != "/proc/sys/net" || m.ReadOnly {
		t.Errorf("agent: %s is not the host's /proc/sys/net, writable (%+v)", inpod.HostProcSysNet, m)
	}
	pinDir, _ := flag(c.Args, "bpf-pin-dir")
	bpffs, ok := mounts["/sys/fs/bpf"]
	if !ok || vols[bpffs.Name].HostPath == nil || vols[bpffs.Name].HostPath.Path != "/sys/fs/bpf" || bpffs.ReadOnly {
		t.Errorf("agent: /sys/fs/bpf is not the host's bpffs, writable (%+v)", bpffs)
	}
	if !strings.HasPrefix(pinDir, "/sys/fs/bpf/") {
		t.Errorf("agent: --bpf-pin-dir=%q is not on the host bpffs mount", pinDir)
	}
	var cg *corev1.VolumeMount
	for _, m := range c.VolumeMounts {
		if v := vols[m.Name]; v.HostPath != nil && v.HostPath.Path == "/sys/fs/cgroup" {
			cg = &m
		}
	}
	if cg == nil || !cg.ReadOnly || cg.MountPropagation == nil || *cg.MountPropagation != corev1.MountPropagationHostToContainer {
		t.Errorf("agent: host /sys/fs/cgroup mount %+v, want read-only with HostToContainer propagation (hybrid hosts' unified sub-mount)", cg)
	}
	tokenFile, ok := flag(c.Args, "ca-token-file")
	if !ok {
		t.Fatal("agent: no --ca-token-file")
	}
	tm, ok := mounts[filepath.Dir(tokenFile)]
	if !ok {
		t.Fatalf("agent: nothing mounted at %s for --ca-token-file", filepath.Dir(tokenFile))
	}
	pv := vols[tm.Name].Projected
	if pv == nil || len(pv.Sources) != 1 || pv.Sources[0].ServiceAccountToken == nil {
		t.Fatalf("agent: %s is not a projected service-account token", tm.MountPath)
	}
	tok := pv.Sources[0].ServiceAccountToken
	if tok.Audience != identity.Audience || tok.Path != filepath.Base(tokenFile) {
		t.Errorf("agent: CA token audience %q path %q, want %q %q", tok.Audience, tok.Path, identity.Audience, filepath.Base(tokenFile))
	}
	if tok.ExpirationSeconds == nil || *tok.ExpirationSeconds > 3600 {
		t.Errorf("agent: CA token lifetime %v, want at most an hour", tok.ExpirationSeconds)
	}

	// Probes on 15021, metrics on 15020.
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Port.IntValue() != 15021 || p.HTTPGet.Path != "/healthz/ready" {
		t.Errorf("agent: readiness probe %+v, want HTTP /healthz/ready on 15021", p)
	}
	for name, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "startup": c.StartupProbe} {
		if p == nil || (p.HTTPGet == nil || p.HTTPGet.Port.IntValue() != 15021) && (p.TCPSocket == nil || p.TCPSocket.Port.IntValue() != 15021) {
			t.Errorf("agent: %s probe %+v, want 15021", name, p)
		}
	}
	ports := map[int32]bool{}
	for _, p := range c.Ports {
		ports[p.ContainerPort] = true
	}
	if !ports[15020] || !ports[15021] {
		t.Errorf("agent: ports %v, want 15020 and 15021", c.Ports)
	}

	// Requests set, so the scheduler reserves room on every node.
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		t.Errorf("agent: requests %v, want cpu and memory", c.Resources.Requests)
	}

	// The kubelet's SIGKILL must come after the drain deadline.
	drain, ok := flag(c.Args, "drain-deadline")
	if !ok {
		t.Fatal("agent: no --drain-deadline")
	}
	d, err := time.ParseDuration(drain)
	if err != nil {
		t.Fatalf("agent: --drain-deadline=%q: %v", drain, err)
	}
	grace := spec.TerminationGracePeriodSeconds
	if grace == nil || time.Duration(*grace)*time.Second < d+5*time.Second || time.Duration(*grace)*time.Second > d+15*time.Second {
		t.Errorf("agent: terminationGracePeriodSeconds %v, want the drain deadline %s plus 5-15 s", grace, d)
	}
	tolerateAll := false
	for _, tl := range spec.Tolerations {
		if tl.Operator == corev1.TolerationOpExists && tl.Key == "" {
			tolerateAll = true
		}
	}
	if !tolerateAll {
		t.Error("agent: does not tolerate every taint; a node without an agent fails its enrolled pods closed")
	}
}

func checkCA(t *testing.T, in install) {
	t.Helper()
	d := get[*appsv1.Deployment](t, in, "Deployment", ns, "nodemesh-ca")
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("ca: replicas %v, want 2", d.Spec.Replicas)
	}
	spec := d.Spec.Template.Spec
	if spec.HostNetwork || spec.HostPID || spec.ServiceAccountName != "nodemesh-ca" {
		t.Errorf("ca: hostNetwork %v hostPID %v serviceAccount %q", spec.HostNetwork, spec.HostPID, spec.ServiceAccountName)
	}
	c := spec.Containers[0]
	checkEnvRefs(t, in, c)
	sc := c.SecurityContext
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil ||
		len(sc.Capabilities.Add) != 0 || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("ca: securityContext %+v, want no privileges at all", sc)
	}
	if ps := spec.SecurityContext; ps == nil || ps.RunAsNonRoot == nil || !*ps.RunAsNonRoot {
		t.Error("ca: may run as root")
	}
	var https *corev1.ContainerPort
	for i, p := range c.Ports {
		if p.ContainerPort == identity.DefaultPort {
			https = &c.Ports[i]
		}
	}
	if https == nil {
		t.Fatalf("ca: no container port %d", identity.DefaultPort)
	}
	if listen, _ := flag(c.Args, "listen"); listen != fmt.Sprintf(":%d", identity.DefaultPort) {
		t.Errorf("ca: --listen=%q, want :%d", listen, identity.DefaultPort)
	}
	for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Scheme != corev1.URISchemeHTTPS || p.HTTPGet.Path != identity.HealthPath ||
			(p.HTTPGet.Port.String() != https.Name && p.HTTPGet.Port.IntValue() != int(identity.DefaultPort)) {
			t.Errorf("ca: %s probe %+v, want HTTPS %s on %d", name, p, identity.HealthPath, identity.DefaultPort)
		}
	}
	svc := get[*corev1.Service](t, in, "Service", ns, "nodemesh-ca")
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != identity.DefaultPort ||
		(svc.Spec.Ports[0].TargetPort.String() != https.Name && svc.Spec.Ports[0].TargetPort.IntValue() != int(identity.DefaultPort)) {
		t.Errorf("ca: Service ports %+v, want %d to the container's https port", svc.Spec.Ports, identity.DefaultPort)
	}
	if !selects(svc.Spec.Selector, d.Spec.Template.Labels) {
		t.Errorf("ca: Service selector %v does not select the CA pods %v", svc.Spec.Selector, d.Spec.Template.Labels)
	}
	pdb := get[*policyv1.PodDisruptionBudget](t, in, "PodDisruptionBudget", ns, "nodemesh-ca")
	if pdb.Spec.Selector == nil || !selects(pdb.Spec.Selector.MatchLabels, d.Spec.Template.Labels) ||
		pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() < 1 {
		t.Errorf("ca: PDB %+v, want minAvailable >= 1 over the CA pods", pdb.Spec)
	}

	// The agent reaches this Service and trusts this bundle.
	ds := get[*appsv1.DaemonSet](t, in, "DaemonSet", ns, "nodemesh-agent")
	agentArgs := ds.Spec.Template.Spec.Containers[0].Args
	if addr, _ := flag(agentArgs, "ca-addr"); addr != fmt.Sprintf("https://%s.$(POD_NAMESPACE).svc:%d", svc.Name, identity.DefaultPort) {
		t.Errorf("agent: --ca-addr=%q does not name the CA Service %s port %d", addr, svc.Name, identity.DefaultPort)
	}
	if id, _ := flag(agentArgs, "ca-spiffe-id"); id != "spiffe://$(TRUST_DOMAIN)/ns/$(POD_NAMESPACE)/sa/"+spec.ServiceAccountName {
		t.Errorf("agent: --ca-spiffe-id=%q, want the CA's service account %s", id, spec.ServiceAccountName)
	}
	if b, _ := flag(c.Args, "bundle-configmap"); b != identity.BundleConfigMap {
		t.Errorf("ca: --bundle-configmap=%q, want %s", b, identity.BundleConfigMap)
	}
	if b, _ := flag(agentArgs, "bundle-configmap"); b != "$(POD_NAMESPACE)/"+identity.BundleConfigMap {
		t.Errorf("agent: --bundle-configmap=%q, want $(POD_NAMESPACE)/%s", b, identity.BundleConfigMap)
	}
	if sa, _ := flag(c.Args, "agent-service-account"); sa != "$(POD_NAMESPACE)/"+ds.Spec.Template.Spec.ServiceAccountName {
		t.Errorf("ca: --agent-service-account=%q, want the agent's %s", sa, ds.Spec.Template.Spec.ServiceAccountName)
	}
}

func selects(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// rulesFor collects the rules bound to service account sa, by scope:
// "" for cluster-wide, else the namespace.
func rulesFor(t *testing.T, in install, sa string) map[string][]rbacv1.PolicyRule {
	t.Helper()
	out := map[string][]rbacv1.PolicyRule{}
	bound := func(subjects []rbacv1.Subject) bool {
		for _, s := range subjects {
			if s.Kind == "ServiceAccount" && s.Name == sa && s.Namespace == ns {
				return true
			}
		}
		return false
	}
	for _, o := range in.typed {
		switch b := o.(type) {
		case *rbacv1.ClusterRoleBinding:
			if bound(b.Subjects) {
				out[""] = append(out[""], get[*rbacv1.ClusterRole](t, in, "ClusterRole", "", b.RoleRef.Name).Rules...)
			}
		case *rbacv1.RoleBinding:
			if !bound(b.Subjects) {
				continue
			}
			if b.RoleRef.Kind == "ClusterRole" {
				out[b.Namespace] = append(out[b.Namespace], get[*rbacv1.ClusterRole](t, in, "ClusterRole", "", b.RoleRef.Name).Rules...)
			} else {
				out[b.Namespace] = append(out[b.Namespace], get[*rbacv1.Role](t, in, "Role", b.Namespace, b.RoleRef.Name).Rules...)
			}
		}
	}
	return out
}

// allows reports whether rules allow verb on group/resource (named name,
// "" for any).
func allows(rules []rbacv1.PolicyRule, verb, group, resource, name string) bool {
	for _, r := range rules {
		if slices.Contains(r.Verbs, verb) && slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) &&
			(len(r.ResourceNames) == 0 || (name != "" && slices.Contains(r.ResourceNames, name))) {
			return true
		}
	}
	return false
}

func checkRBAC(t *testing.T, in install) {
	t.Helper()
	for _, o := range in.typed {
		var rules []rbacv1.PolicyRule
		switch r := o.(type) {
		case *rbacv1.ClusterRole:
			rules = r.Rules
		case *rbacv1.Role:
			rules = r.Rules
		}
		for _, r := range rules {
			for _, l := range [][]string{r.Verbs, r.APIGroups, r.Resources} {
				if slices.Contains(l, "*") {
					t.Errorf("wildcard in RBAC rule %+v", r)
				}
			}
			if len(r.NonResourceURLs) > 0 {
				t.Errorf("non-resource URL rule %+v", r)
			}
		}
	}

	agent := rulesFor(t, in, "nodemesh-agent")
	// Read-only, everywhere, except its node mark (agent/rollout): Leases
	// in its own namespace.
	for scope, rules := range agent {
		for _, r := range rules {
			mark := scope == ns && slices.Equal(r.APIGroups, []string{"coordination.k8s.io"}) && slices.Equal(r.Resources, []string{"leases"})
			for _, v := range r.Verbs {
				if !slices.Contains([]string{"get", "list", "watch"}, v) && !(mark && slices.Contains([]string{"create", "update", "delete"}, v)) {
					t.Errorf("agent may %s %v in %q; it only reads, and writes its node mark (leases in %s)", v, r.Resources, scope, ns)
				}
			}
			if slices.Contains(r.Resources, "secrets") {
				t.Errorf("agent may read secrets in %q", scope)
			}
		}
	}
	// Everything its informers watch, cluster-wide (agent/k8s).
	watched := []struct{ group, resource string }{
		{"", "pods"}, {"", "services"}, {"", "namespaces"}, {"", "nodes"},
		{"discovery.k8s.io", "endpointslices"}, {"networking.k8s.io", "networkpolicies"},
		{v1alpha1.AuthorizationPolicyResource.Group, v1alpha1.AuthorizationPolicyResource.Resource},
		{v1alpha1.PeerAuthenticationResource.Group, v1alpha1.PeerAuthenticationResource.Resource},
		{"gateway.networking.k8s.io", "httproutes"}, {"gateway.networking.k8s.io", "grpcroutes"},
		{"traffic.nodemesh.io", "trafficpolicies"},
	}
	for _, w := range watched {
		for _, v := range []string{"list", "watch"} {
			if !allows(agent[""], v, w.group, w.resource, "") {
				t.Errorf("agent may not %s %s.%s cluster-wide", v, w.resource, w.group)
			}
		}
	}
	for _, v := range []string{"get", "list", "watch"} {
		if !allows(agent[ns], v, "", "configmaps", identity.BundleConfigMap) {
			t.Errorf("agent may not %s the trust bundle ConfigMap", v)
		}
	}
	for _, v := range []string{"get", "list", "watch", "create", "update", "delete"} {
		if !allows(agent[ns], v, "coordination.k8s.io", "leases", "") {
			t.Errorf("agent may not %s leases in %s (its node mark)", v, ns)
		}
		if v != "get" && v != "list" && v != "watch" && allows(agent[""], v, "coordination.k8s.io", "leases", "") {
			t.Errorf("agent may %s leases cluster-wide; only its mark in %s is needed", v, ns)
		}
	}
	if allows(agent[ns], "list", "", "configmaps", "") || allows(agent[""], "list", "", "configmaps", "") {
		t.Error("agent may list every ConfigMap; only the trust bundle is needed")
	}

	ca := rulesFor(t, in, "nodemesh-ca")
	if !allows(ca[""], "create", "authentication.k8s.io", "tokenreviews", "") {
		t.Error("CA may not create TokenReviews")
	}
	for _, v := range []string{"get", "list"} {
		if !allows(ca[""], v, "", "pods", "") {
			t.Errorf("CA may not %s pods cluster-wide", v)
		}
	}
	for _, r := range ca[""] {
		if slices.Contains(r.Resources, "secrets") || slices.Contains(r.Resources, "configmaps") {
			t.Errorf("CA has cluster-wide access to %v; its Secrets and ConfigMap are in %s only", r.Resources, ns)
		}
		for _, v := range r.Verbs {
			if v != "get" && v != "list" && v != "watch" && !(v == "create" && slices.Equal(r.Resources, []string{"tokenreviews"})) {
				t.Errorf("CA may %s %v cluster-wide", v, r.Resources)
			}
		}
	}
	d := get[*appsv1.Deployment](t, in, "Deployment", ns, "nodemesh-ca")
	args := d.Spec.Template.Spec.Containers[0].Args
	for _, f := range []string{"root-secret", "ca-secret"} {
		if name, ok := flag(args, f); ok {
			if !allows(ca[ns], "get", "", "secrets", name) {
				t.Errorf("CA may not read its Secret %s (--%s)", name, f)
			}
			if allows(ca[ns], "get", "", "secrets", "some-other-secret") {
				t.Error("CA may read any Secret in its namespace")
			}
		}
	}
	for _, v := range []string{"get", "update"} {
		if !allows(ca[ns], v, "", "configmaps", identity.BundleConfigMap) {
			t.Errorf("CA may not %s the bundle ConfigMap", v)
		}
	}
}

// TestOverlays checks what each overlay is for.
func TestOverlays(t *testing.T) {
	lab := render(t, "overlays/lab")
	for _, kind := range []string{"DaemonSet", "Deployment"} {
		var spec corev1.PodSpec
		switch kind {
		case "DaemonSet":
			spec = get[*appsv1.DaemonSet](t, lab, kind, ns, "nodemesh-agent").Spec.Template.Spec
		default:
			spec = get[*appsv1.Deployment](t, lab, kind, ns, "nodemesh-ca").Spec.Template.Spec
		}
		c := spec.Containers[0]
		if c.ImagePullPolicy != corev1.PullNever || !strings.HasPrefix(c.Image, "localhost/") {
			t.Errorf("lab %s: image %s pull %s, want a local image never pulled", kind, c.Image, c.ImagePullPolicy)
		}
	}
	if cm := get[*corev1.ConfigMap](t, lab, "ConfigMap", ns, "nodemesh-config"); cm.Data["access-log"] != "true" {
		t.Errorf("lab: access-log %q, want true", cm.Data["access-log"])
	}

	// Real nodes without cluster DNS: the agents reach the CA's fixed
	// ClusterIP under the name their --ca-addr has, through a host alias.
	cl := render(t, "overlays/cluster")
	caIP := get[*corev1.Service](t, cl, "Service", ns, "nodemesh-ca").Spec.ClusterIP
	agent := get[*appsv1.DaemonSet](t, cl, "DaemonSet", ns, "nodemesh-agent").Spec.Template.Spec
	caAddr, _ := flag(agent.Containers[0].Args, "ca-addr")
	caHost := strings.Replace(strings.TrimPrefix(caAddr, "https://"), "$(POD_NAMESPACE)", ns, 1)
	caHost, _, _ = strings.Cut(caHost, ":")
	if len(agent.HostAliases) != 1 || agent.HostAliases[0].IP != caIP || !slices.Equal(agent.HostAliases[0].Hostnames, []string{caHost}) {
		t.Errorf("cluster: agent host aliases %+v, want %s for %s (the CA Service's ClusterIP)", agent.HostAliases, caHost, caIP)
	}
	if !strings.HasPrefix(caIP, "10.96.0.") || !agent.HostNetwork {
		t.Errorf("cluster: CA ClusterIP %q, want a fixed address in the lab's 10.96.0.0/16", caIP)
	}
	if un := render(t, "overlays/cluster/uninstall"); !strings.HasPrefix(get[*appsv1.DaemonSet](t, un, "DaemonSet", ns, "nodemesh-node-cleanup").Spec.Template.Spec.Containers[0].Image, "localhost/busybox:") {
		t.Error("cluster uninstall: the cleanup image is not the locally built busybox")
	}

	prod := render(t, "overlays/production")
	args := get[*appsv1.Deployment](t, prod, "Deployment", ns, "nodemesh-ca").Spec.Template.Spec.Containers[0].Args
	if s, _ := flag(args, "ca-secret"); s == "" {
		t.Error("production: the CA does not use a provided root (--ca-secret)")
	}
	def := render(t, ".")
	// Everything else the base CA is told stays: only the generated root
	// is swapped for the provided one (a strategic merge replaces the
	// whole list, so a flag added to the base is lost here unless copied).
	defArgs := get[*appsv1.Deployment](t, def, "Deployment", ns, "nodemesh-ca").Spec.Template.Spec.Containers[0].Args
	swap := func(a []string) []string {
		return slices.DeleteFunc(slices.Clone(a), func(s string) bool {
			return strings.HasPrefix(s, "--root-secret=") || strings.HasPrefix(s, "--ca-secret=")
		})
	}
	if got, want := swap(args), swap(defArgs); !slices.Equal(got, want) {
		t.Errorf("production: the CA's arguments besides the root differ from the base's:\n%v\n%v", got, want)
	}
	dsDef := get[*appsv1.DaemonSet](t, def, "DaemonSet", ns, "nodemesh-agent").Spec.Template.Spec.Containers[0]
	dsProd := get[*appsv1.DaemonSet](t, prod, "DaemonSet", ns, "nodemesh-agent").Spec.Template.Spec.Containers[0]
	if dsProd.Resources.Limits.Memory().Cmp(*dsDef.Resources.Limits.Memory()) <= 0 {
		t.Errorf("production: agent memory limit %v not above the default %v", dsProd.Resources.Limits.Memory(), dsDef.Resources.Limits.Memory())
	}
	if !slices.Equal(dsProd.Args, dsDef.Args) {
		t.Errorf("production changes the agent's arguments:\n%v\n%v", dsProd.Args, dsDef.Args)
	}

	// SPIRE: the base's arguments plus the identity source and its
	// socket, and the SPIRE agent's socket directory mounted from the host.
	sp := get[*appsv1.DaemonSet](t, render(t, "overlays/spire"), "DaemonSet", ns, "nodemesh-agent").Spec.Template.Spec
	spc := sp.Containers[0]
	if src, _ := flag(spc.Args, "identity-source"); src != "spiffe-workload-api" || !slices.Equal(spc.Args[:len(dsDef.Args)], dsDef.Args) {
		t.Errorf("spire: agent arguments %v, want the base's and --identity-source=spiffe-workload-api", spc.Args)
	}
	sock, _ := flag(spc.Args, "spiffe-endpoint-socket")
	sockDir := path.Dir(strings.TrimPrefix(sock, "unix://"))
	mounted := false
	for _, m := range spc.VolumeMounts {
		if m.MountPath != sockDir {
			continue
		}
		for _, v := range sp.Volumes {
			mounted = mounted || (v.Name == m.Name && v.HostPath != nil && v.HostPath.Path == sockDir)
		}
	}
	if !strings.HasPrefix(sock, "unix:///") || !mounted {
		t.Errorf("spire: socket %q, its directory not mounted from the host at the same path (mounts %+v)", sock, spc.VolumeMounts)
	}
}

// TestUninstallMatchesAgent: the node cleanup removes exactly the agent's
// pin directory, from the host's bpffs, on every node the agent runs on.
func TestUninstallMatchesAgent(t *testing.T) {
	un := render(t, uninstall)
	ds := get[*appsv1.DaemonSet](t, un, "DaemonSet", ns, "nodemesh-node-cleanup")
	agent := get[*appsv1.DaemonSet](t, render(t, "."), "DaemonSet", ns, "nodemesh-agent")
	pinDir, _ := flag(agent.Spec.Template.Spec.Containers[0].Args, "bpf-pin-dir")
	c := ds.Spec.Template.Spec.Containers[0]
	var env string
	for _, e := range c.Env {
		if e.Name == "PIN_DIR" {
			env = e.Value
		}
	}
	if env == "" || env != pinDir {
		t.Errorf("cleanup PIN_DIR %q, want the agent's --bpf-pin-dir %q", env, pinDir)
	}
	hostBPF := false
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil && v.HostPath.Path == "/sys/fs/bpf" {
			for _, m := range c.VolumeMounts {
				if m.Name == v.Name && m.MountPath == "/sys/fs/bpf" && !m.ReadOnly {
					hostBPF = true
				}
			}
		}
	}
	if !hostBPF {
		t.Error("cleanup does not mount the host's /sys/fs/bpf writable at the same path")
	}
	if !slices.Equal(ds.Spec.Template.Spec.Tolerations, agent.Spec.Template.Spec.Tolerations) ||
		!maps.Equal(ds.Spec.Template.Spec.NodeSelector, agent.Spec.Template.Spec.NodeSelector) {
		t.Error("cleanup does not reach every node the agent runs on (tolerations, nodeSelector)")
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.Exec == nil {
		t.Error("cleanup has no readiness probe telling when a node is clean")
	}
}

// TestMeshPolicy: the mesh-wide default sits in the root namespace the
// policy engine reads, without a selector, and the install itself holds no
// custom resource (one kubectl apply -k must work on a fresh cluster).
func TestMeshPolicy(t *testing.T) {
	mp := render(t, meshPolicy)
	pa := get[*unstructured.Unstructured](t, mp, "PeerAuthentication", policy.DefaultRootNamespace, "default")
	if _, found, _ := unstructured.NestedFieldNoCopy(pa.Object, "spec", "selector"); found {
		t.Error("the mesh-wide PeerAuthentication has a selector")
	}
	if mode, _, _ := unstructured.NestedString(pa.Object, "spec", "mtls", "mode"); mode != "PERMISSIVE" {
		t.Errorf("mesh-wide mode %q, want PERMISSIVE (the engine's default, written down)", mode)
	}
	for _, dir := range installs {
		for _, o := range render(t, dir).objs {
			if o.GroupVersionKind().Group == v1alpha1.SchemeGroupVersion.Group {
				t.Errorf("%s holds custom resource %s %s: a single apply on a fresh cluster would fail", dir, o.GetKind(), o.GetName())
			}
		}
	}
}

// checkLeaseAdmission: the policies that restrict each agent to its own
// node's Lease are installed, fail closed, match the agent's real service
// account, and the name policy denies while the holder policy warns
// (TestLabAgentLeaseAdmission shows both work).
func checkLeaseAdmission(t *testing.T, in install) {
	t.Helper()
	sa := get[*corev1.ServiceAccount](t, in, "ServiceAccount", ns, "nodemesh-agent")
	user := "'system:serviceaccount:" + sa.Namespace + ":" + sa.Name + "'"
	for name, actions := range map[string][]admissionv1.ValidationAction{
		agentLeasePolicy:       {admissionv1.Deny},
		agentLeaseHolderPolicy: {admissionv1.Warn, admissionv1.Audit},
	} {
		vap := get[*admissionv1.ValidatingAdmissionPolicy](t, in, "ValidatingAdmissionPolicy", "", name)
		if vap.Spec.FailurePolicy == nil || *vap.Spec.FailurePolicy != admissionv1.Fail {
			t.Errorf("policy %s: failurePolicy %v, want Fail", vap.Name, vap.Spec.FailurePolicy)
		}
		if len(vap.Spec.MatchConditions) != 1 || !strings.Contains(vap.Spec.MatchConditions[0].Expression, user) {
			t.Errorf("policy %s: match conditions %+v, want the one that selects %s", vap.Name, vap.Spec.MatchConditions, user)
		}
		b := get[*admissionv1.ValidatingAdmissionPolicyBinding](t, in, "ValidatingAdmissionPolicyBinding", "", name)
		if b.Spec.PolicyName != vap.Name || !slices.Equal(b.Spec.ValidationActions, actions) {
			t.Errorf("binding %s: policy %q actions %v, want %s with %v", b.Name, b.Spec.PolicyName, b.Spec.ValidationActions, vap.Name, actions)
		}
	}
}
