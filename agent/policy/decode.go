package policy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// maxDocumentSize bounds one YAML document; policy files are small.
const maxDocumentSize = 4 << 20

// ValidateNetworkPolicy reports why the engine would refuse np (nil if it accepts it).
func ValidateNetworkPolicy(np *networkingv1.NetworkPolicy) error {
	_, err := compileNetworkPolicy(np)
	return err
}

// ValidateAuthorizationPolicy reports why the engine would refuse ap,
// including L7 fields (wrapping ErrL7Unsupported).
func ValidateAuthorizationPolicy(ap *v1alpha1.AuthorizationPolicy) error {
	_, err := compileAuthorizationPolicy(ap)
	return err
}

// ValidatePeerAuthentication reports why the engine would refuse pa.
func ValidatePeerAuthentication(pa *v1alpha1.PeerAuthentication) error {
	_, err := compilePeerAuthentication(pa)
	return err
}

// Decode parses Kubernetes YAML or JSON (one or more documents, or v1 List
// objects) and appends the Namespaces, Pods, Nodes, NetworkPolicies,
// AuthorizationPolicies and PeerAuthentications to in. Policies are decoded
// strictly (an unknown or misspelt field is an error, since ignoring it could
// widen access) and validated as the engine would; every bad document is
// reported, named by source and document number. Objects of other kinds are
// skipped and returned as "Kind namespace/name". Namespaced objects without a
// namespace get "default", as kubectl would give them.
func Decode(source string, data []byte, in *Input) (skipped []string, err error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var errs []error
	for doc := 1; ; doc++ {
		b, rerr := r.Read()
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			errs = append(errs, fmt.Errorf("%s: document %d: reading YAML: %w", source, doc, rerr))
			break
		}
		if len(b) > maxDocumentSize {
			errs = append(errs, fmt.Errorf("%s: document %d: larger than %d bytes", source, doc, maxDocumentSize))
			continue
		}
		sk, derr := decodeDocument(b, in, 0)
		skipped = append(skipped, sk...)
		if derr != nil {
			errs = append(errs, fmt.Errorf("%s: document %d: %w", source, doc, derr))
		}
	}
	return skipped, errors.Join(errs...)
}

func isBlank(b []byte) bool {
	for _, line := range strings.Split(string(b), "\n") {
		t := strings.TrimSpace(line)
		if t != "" && !strings.HasPrefix(t, "#") && t != "---" {
			return false
		}
	}
	return true
}

func decodeDocument(b []byte, in *Input, depth int) ([]string, error) {
	if isBlank(b) {
		return nil, nil
	}
	var tm struct {
		metav1.TypeMeta `json:",inline"`
		Metadata        struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
		Items []json.RawMessage `json:"items"`
	}
	if err := yaml.Unmarshal(b, &tm); err != nil {
		return nil, fmt.Errorf("parsing YAML: %w", err)
	}
	if tm.Kind == "" || tm.APIVersion == "" {
		return nil, errors.New("not a Kubernetes object: apiVersion and kind are required")
	}
	gv := tm.APIVersion
	ref := tm.Kind + " " + tm.Metadata.Namespace + "/" + tm.Metadata.Name
	switch {
	case tm.Kind == "List" || (strings.HasSuffix(tm.Kind, "List") && tm.Items != nil):
		if depth > 0 {
			return nil, errors.New("nested List objects are not supported")
		}
		var skipped []string
		var errs []error
		for i, item := range tm.Items {
			sk, err := decodeDocument(item, in, depth+1)
			skipped = append(skipped, sk...)
			if err != nil {
				errs = append(errs, fmt.Errorf("items[%d]: %w", i, err))
			}
		}
		return skipped, errors.Join(errs...)
	case tm.Kind == "Namespace" && gv == "v1":
		var ns corev1.Namespace
		if err := yaml.Unmarshal(b, &ns); err != nil {
			return nil, fmt.Errorf("decoding %s: %w", ref, err)
		}
		if ns.Name == "" {
			return nil, errors.New("Namespace without metadata.name")
		}
		in.Namespaces = append(in.Namespaces, NamespaceFromK8s(&ns))
	case tm.Kind == "Pod" && gv == "v1":
		var p corev1.Pod
		if err := yaml.Unmarshal(b, &p); err != nil {
			return nil, fmt.Errorf("decoding %s: %w", ref, err)
		}
		if p.Name == "" {
			return nil, errors.New("Pod without metadata.name")
		}
		defaultNamespace(&p.ObjectMeta)
		in.Pods = append(in.Pods, PodFromK8s(&p))
	case tm.Kind == "Node" && gv == "v1":
		var n corev1.Node
		if err := yaml.Unmarshal(b, &n); err != nil {
			return nil, fmt.Errorf("decoding %s: %w", ref, err)
		}
		in.Nodes = append(in.Nodes, NodeFromK8s(&n))
	case tm.Kind == "NetworkPolicy":
		if gv != "networking.k8s.io/v1" {
			return nil, fmt.Errorf("%s: apiVersion %q: want networking.k8s.io/v1", ref, gv)
		}
		var np networkingv1.NetworkPolicy
		if err := yaml.UnmarshalStrict(b, &np); err != nil {
			return nil, fmt.Errorf("decoding %s: %w", ref, err)
		}
		defaultNamespace(&np.ObjectMeta)
		if err := ValidateNetworkPolicy(&np); err != nil {
			return nil, fmt.Errorf("NetworkPolicy %s/%s refused: %w", np.Namespace, np.Name, err)
		}
		in.NetworkPolicies = append(in.NetworkPolicies, &np)
	case tm.Kind == "AuthorizationPolicy" || tm.Kind == "PeerAuthentication":
		if gv != v1alpha1.SchemeGroupVersion.String() {
			hint := ""
			if strings.HasPrefix(gv, "security.istio.io/") {
				hint = " (to port an Istio policy, change apiVersion; the fields are the same)"
			}
			return nil, fmt.Errorf("%s: apiVersion %q: want %s%s", ref, gv, v1alpha1.SchemeGroupVersion, hint)
		}
		if tm.Kind == "AuthorizationPolicy" {
			var ap v1alpha1.AuthorizationPolicy
			if err := yaml.UnmarshalStrict(b, &ap); err != nil {
				return nil, fmt.Errorf("decoding %s: %w", ref, err)
			}
			defaultNamespace(&ap.ObjectMeta)
			if err := ValidateAuthorizationPolicy(&ap); err != nil {
				return nil, fmt.Errorf("AuthorizationPolicy %s/%s refused: %w", ap.Namespace, ap.Name, err)
			}
			in.AuthorizationPolicies = append(in.AuthorizationPolicies, &ap)
		} else {
			var pa v1alpha1.PeerAuthentication
			if err := yaml.UnmarshalStrict(b, &pa); err != nil {
				return nil, fmt.Errorf("decoding %s: %w", ref, err)
			}
			defaultNamespace(&pa.ObjectMeta)
			if err := ValidatePeerAuthentication(&pa); err != nil {
				return nil, fmt.Errorf("PeerAuthentication %s/%s refused: %w", pa.Namespace, pa.Name, err)
			}
			in.PeerAuthentications = append(in.PeerAuthentications, &pa)
		}
	default:
		return []string{ref}, nil
	}
	return nil, nil
}

func defaultNamespace(m *metav1.ObjectMeta) {
	if m.Namespace == "" {
		m.Namespace = "default"
	}
}
