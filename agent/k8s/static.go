package k8s

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/nodemesh/nodemesh/agent/k8s/yamljson"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
)

// maxManifestBytes bounds one file, so a wrong directory (a log, a disk
// image) fails fast instead of filling memory.
const maxManifestBytes = 32 << 20

// Manifests are the objects a set of Kubernetes YAML documents declares,
// already converted to the state's form.
type Manifests struct {
	Namespaces      []*state.Namespace
	Nodes           []*state.Node
	Pods            []*state.Pod
	Services        []*state.Service
	EndpointSlices  []*state.EndpointSlice
	NetworkPolicies []*state.NetworkPolicy
	Objects         []*state.Object
	// Skipped lists documents of kinds the agent does not use
	// ("apps/v1 Deployment default/web"), which are ignored.
	Skipped []string
}

// Apply replaces the store's content with m.
func (m *Manifests) Apply(tx *state.Tx) {
	tx.Reset()
	for _, n := range m.Namespaces {
		tx.SetNamespace(n)
	}
	for _, n := range m.Nodes {
		tx.SetNode(n)
	}
	for _, p := range m.Pods {
		tx.SetPod(p)
	}
	for _, s := range m.Services {
		tx.SetService(s)
	}
	for _, es := range m.EndpointSlices {
		tx.SetEndpointSlice(es)
	}
	for _, np := range m.NetworkPolicies {
		tx.SetNetworkPolicy(np)
	}
	for _, o := range m.Objects {
		tx.SetObject(o)
	}
}

// ParseManifests adds the objects of one YAML or JSON stream (several
// documents separated by "---", and v1 List objects) to m. name labels
// errors. YAML is read with YAML 1.2 scalars (yamljson: a namespace named
// "y" stays "y"). Decoding is strict: an unknown or misspelt field is an error,
// because silently dropping, say, a misspelt label would change enrollment.
// Objects of the custom resource groups in DefaultCustomResources are kept
// unstructured; other kinds the agent does not use are listed in Skipped.
func (m *Manifests) ParseManifests(name string, data []byte) error {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var errs []error
	for doc := 1; ; doc++ {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			return errors.Join(errs...)
		}
		if err != nil {
			return errors.Join(append(errs, fmt.Errorf("reading %s document %d: %w", name, doc, err))...)
		}
		if len(bytes.TrimSpace(raw)) == 0 {
			continue
		}
		js, err := yamljson.ToJSON(raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("parsing %s document %d: %w", name, doc, err))
			continue
		}
		if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
			continue // a document of only comments
		}
		if err := m.add(js, 0); err != nil {
			errs = append(errs, fmt.Errorf("%s document %d: %w", name, doc, err))
		}
	}
}

var customGroups = func() map[string]bool {
	g := make(map[string]bool)
	for _, r := range DefaultCustomResources {
		g[r.Group] = true
	}
	return g
}()

func (m *Manifests) add(js []byte, depth int) error {
	var tm struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Items      []json.RawMessage `json:"items"`
		Metadata   struct {
			Namespace string `json:"namespace"`
			Name      string `json:"name"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(js, &tm); err != nil {
		return fmt.Errorf("decoding object header: %w (each document must be a Kubernetes object)", err)
	}
	if tm.APIVersion == "" || tm.Kind == "" {
		return errors.New("object without apiVersion or kind")
	}
	gv, err := schema.ParseGroupVersion(tm.APIVersion)
	if err != nil {
		return fmt.Errorf("parsing apiVersion %q: %w", tm.APIVersion, err)
	}
	if tm.Kind == "List" && gv.Group == "" {
		if depth > 0 {
			return errors.New("a List inside a List")
		}
		for i, item := range tm.Items {
			if err := m.add(item, depth+1); err != nil {
				return fmt.Errorf("item %d of a v1 List: %w", i, err)
			}
		}
		return nil
	}
	if tm.Metadata.Name == "" {
		return fmt.Errorf("%s %s without metadata.name", tm.APIVersion, tm.Kind)
	}
	where := fmt.Sprintf("%s %s %s", tm.APIVersion, tm.Kind, state.Key{Namespace: tm.Metadata.Namespace, Name: tm.Metadata.Name})
	switch gv.WithKind(tm.Kind) {
	case corev1.SchemeGroupVersion.WithKind("Namespace"):
		var n corev1.Namespace
		if err := strict(js, &n); err != nil {
			return fmt.Errorf("decoding %s: %w", where, err)
		}
		m.Namespaces = append(m.Namespaces, ConvertNamespace(&n))
	case corev1.SchemeGroupVersion.WithKind("Node"):
		var n corev1.Node
		if err := strict(js, &n); err != nil {
			return fmt.Errorf("decoding %s: %w", where, err)
		}
		c, err := ConvertNode(&n)
		if err != nil {
			return err
		}
		m.Nodes = append(m.Nodes, c)
	case corev1.SchemeGroupVersion.WithKind("Pod"):
		var p corev1.Pod
		if err := strict(js, &p); err != nil {
			return fmt.Errorf("decoding %s: %w", where, err)
		}
		defaultNamespace(&p.Namespace)
		c, err := ConvertPod(&p)
		if err != nil {
			return err
		}
		m.Pods = append(m.Pods, c)
	case corev1.SchemeGroupVersion.WithKind("Service"):
		var s corev1.Service
		if err := strict(js, &s); err != nil {
			return fmt.Errorf("decoding %s: %w", where, err)
		}
		defaultNamespace(&s.Namespace)
		c, err := ConvertService(&s)
		if err != nil {
			return err
		}
		m.Services = append(m.Services, c)
	case discoveryv1.SchemeGroupVersion.WithKind("EndpointSlice"):
		var es discoveryv1.EndpointSlice
		if err := strict(js, &es); err != nil {
			return fmt.Errorf("decoding %s: %w", where, err)
		}
		defaultNamespace(&es.Namespace)
		c, err := ConvertEndpointSlice(&es)
		if err != nil {
			return err
		}
		if c.Service == "" {
			return fmt.Errorf("%s has no %s label, so it belongs to no service", where, state.LabelServiceName)
		}
		m.EndpointSlices = append(m.EndpointSlices, c)
	case networkingv1.SchemeGroupVersion.WithKind("NetworkPolicy"):
		var np networkingv1.NetworkPolicy
		if err := strict(js, &np); err != nil {
			return fmt.Errorf("decoding %s: %w", where, err)
		}
		defaultNamespace(&np.Namespace)
		m.NetworkPolicies = append(m.NetworkPolicies, &np)
	default:
		if gv.Group == "security.istio.io" && (tm.Kind == "AuthorizationPolicy" || tm.Kind == "PeerAuthentication") {
			return fmt.Errorf("%s: nodemesh reads %s, not Istio's group (to port an Istio policy, change apiVersion; the fields are the same)", where, v1alpha1.SchemeGroupVersion)
		}
		if !customGroups[gv.Group] {
			m.Skipped = append(m.Skipped, where)
			return nil
		}
		if gv != v1alpha1.SchemeGroupVersion {
			return fmt.Errorf("%s: unsupported version of %s (this agent reads %s)", where, gv.Group, v1alpha1.SchemeGroupVersion)
		}
		var u unstructured.Unstructured
		if err := u.UnmarshalJSON(js); err != nil {
			return fmt.Errorf("decoding %s: %w", where, err)
		}
		if u.GetNamespace() == "" {
			u.SetNamespace(corev1.NamespaceDefault)
		}
		m.Objects = append(m.Objects, ConvertObject(&u))
	}
	return nil
}

func defaultNamespace(ns *string) {
	if *ns == "" {
		*ns = corev1.NamespaceDefault
	}
}

func strict(js []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(js))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return errors.New("trailing data after the object")
	}
	return nil
}

// check rejects a set of manifests that names one object twice: which one
// wins would depend on file order.
func (m *Manifests) check() error {
	seen := make(map[string]bool)
	dup := func(kind string, k state.Key) error {
		id := kind + " " + k.String()
		if seen[id] {
			return fmt.Errorf("%s is declared twice", id)
		}
		seen[id] = true
		return nil
	}
	var errs []error
	for _, n := range m.Namespaces {
		errs = append(errs, dup("Namespace", state.Key{Name: n.Name}))
	}
	for _, n := range m.Nodes {
		errs = append(errs, dup("Node", state.Key{Name: n.Name}))
	}
	for _, p := range m.Pods {
		errs = append(errs, dup("Pod", p.Key()))
	}
	for _, s := range m.Services {
		errs = append(errs, dup("Service", s.Key()))
	}
	for _, es := range m.EndpointSlices {
		errs = append(errs, dup("EndpointSlice", es.Key()))
	}
	for _, np := range m.NetworkPolicies {
		errs = append(errs, dup("NetworkPolicy", state.Key{Namespace: np.Namespace, Name: np.Name}))
	}
	for _, o := range m.Objects {
		errs = append(errs, dup(o.GroupKind.String(), o.Key()))
	}
	return errors.Join(errs...)
}

// LoadDir reads every *.yaml, *.yml and *.json file under dir
// (recursively, skipping hidden files and directories such as a ConfigMap
// mount's ..data), in path order. It returns the manifests and a digest of
// the files' contents, or every problem found.
func LoadDir(dir string) (*Manifests, [32]byte, error) {
	var sum [32]byte
	files, err := manifestFiles(dir)
	if err != nil {
		return nil, sum, err
	}
	m := &Manifests{}
	h := sha256.New()
	var errs []error
	for _, f := range files {
		data, err := readLimited(f)
		if err != nil {
			return nil, sum, err
		}
		rel, _ := filepath.Rel(dir, f)
		fmt.Fprintf(h, "%s\x00%d\x00", rel, len(data))
		h.Write(data)
		if err := m.ParseManifests(rel, data); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, sum, fmt.Errorf("loading manifests from %s: %w", dir, errors.Join(errs...))
	}
	if err := m.check(); err != nil {
		return nil, sum, fmt.Errorf("loading manifests from %s: %w", dir, err)
	}
	copy(sum[:], h.Sum(nil))
	return m, sum, nil
}

func manifestFiles(dir string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path != dir && strings.HasPrefix(e.Name(), ".") {
			if e.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if e.IsDir() {
			return nil
		}
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".yaml", ".yml", ".json":
			out = append(out, path)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading manifest directory: %w", err)
	}
	slices.Sort(out)
	return out, nil
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxManifestBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading manifest %s: %w", path, err)
	}
	if len(data) > maxManifestBytes {
		return nil, fmt.Errorf("reading manifest %s: larger than %d bytes", path, maxManifestBytes)
	}
	return data, nil
}

// Static feeds a store from a directory of Kubernetes YAML, for machines
// without an API server. The directory is re-read every Interval; a change
// replaces the whole state at once. A directory that fails to load leaves
// the last good state in force (and is logged), as an unreachable API server
// would.
type Static struct {
	Dir   string
	Store *state.Store
	Log   *slog.Logger
	// Interval defaults to 5 s.
	Interval time.Duration
}

// Run loads the directory (failing if the first load fails), marks the
// store synced, and reloads on changes until ctx ends.
func (s *Static) Run(ctx context.Context) error {
	log := s.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	every := s.Interval
	if every <= 0 {
		every = 5 * time.Second
	}
	m, sum, err := LoadDir(s.Dir)
	if err != nil {
		return err
	}
	s.apply(m, log)
	s.Store.MarkSynced()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		m, next, err := LoadDir(s.Dir)
		if err != nil {
			log.Error("reloading static manifests failed, keeping the last good state", "dir", s.Dir, "err", err)
			continue
		}
		if next == sum {
			continue
		}
		sum = next
		s.apply(m, log)
	}
}

func (s *Static) apply(m *Manifests, log *slog.Logger) {
	s.Store.Update(m.Apply)
	for _, sk := range m.Skipped {
		log.Debug("static manifests: ignoring a kind the agent does not use", "object", sk)
	}
	log.Info("static manifests loaded", "dir", s.Dir, "pods", len(m.Pods), "services", len(m.Services),
		"endpointslices", len(m.EndpointSlices), "namespaces", len(m.Namespaces), "version", s.Store.Version())
}
