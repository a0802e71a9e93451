package policy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// decodePolicies appends the NetworkPolicies, AuthorizationPolicies and
// PeerAuthentications of YAML test fixtures to in, strictly decoded and
// validated as the engine would. It is test scaffolding for building
// inputs: the agent's and nodemeshctl's intake of Kubernetes objects is
// agent/k8s (into agent/state, then agent/policy/fromstate).
func decodePolicies(source string, data []byte, in *Input) error {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var errs []error
	for doc := 1; ; doc++ {
		b, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: document %d: %w", source, doc, err))
			break
		}
		if err := decodePolicy(b, in); err != nil {
			errs = append(errs, fmt.Errorf("%s: document %d: %w", source, doc, err))
		}
	}
	return errors.Join(errs...)
}

func decodePolicy(b []byte, in *Input) error {
	if strings.TrimSpace(strings.ReplaceAll(string(b), "---", "")) == "" {
		return nil
	}
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(b, &tm); err != nil {
		return err
	}
	ns := func(m *metav1.ObjectMeta) {
		if m.Namespace == "" {
			m.Namespace = "default"
		}
	}
	switch tm.Kind {
	case "NetworkPolicy":
		var np networkingv1.NetworkPolicy
		if err := yaml.UnmarshalStrict(b, &np); err != nil {
			return err
		}
		ns(&np.ObjectMeta)
		if err := ValidateNetworkPolicy(&np); err != nil {
			return fmt.Errorf("NetworkPolicy %s/%s refused: %w", np.Namespace, np.Name, err)
		}
		in.NetworkPolicies = append(in.NetworkPolicies, &np)
	case "AuthorizationPolicy":
		var ap v1alpha1.AuthorizationPolicy
		if err := yaml.UnmarshalStrict(b, &ap); err != nil {
			return err
		}
		ns(&ap.ObjectMeta)
		if err := ValidateAuthorizationPolicy(&ap); err != nil {
			return fmt.Errorf("AuthorizationPolicy %s/%s refused: %w", ap.Namespace, ap.Name, err)
		}
		in.AuthorizationPolicies = append(in.AuthorizationPolicies, &ap)
	case "PeerAuthentication":
		var pa v1alpha1.PeerAuthentication
		if err := yaml.UnmarshalStrict(b, &pa); err != nil {
			return err
		}
		ns(&pa.ObjectMeta)
		if err := ValidatePeerAuthentication(&pa); err != nil {
			return fmt.Errorf("PeerAuthentication %s/%s refused: %w", pa.Namespace, pa.Name, err)
		}
		in.PeerAuthentications = append(in.PeerAuthentications, &pa)
	default:
		return fmt.Errorf("test fixture of kind %q: only policies are decoded here", tm.Kind)
	}
	return nil
}
