package manifests

import (
	"embed"
	"fmt"
	"io/fs"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

//go:embed crds/*_*.yaml
var crdFiles embed.FS

// CRDs returns nodemesh's CustomResourceDefinitions (crds/), built into the
// binary, for tools that install them without the source tree (the demo).
func CRDs() ([]*unstructured.Unstructured, error) {
	names, err := fs.Glob(crdFiles, "crds/*_*.yaml")
	if err != nil {
		return nil, err
	}
	var out []*unstructured.Unstructured
	for _, n := range names {
		b, err := crdFiles.ReadFile(n)
		if err != nil {
			return nil, err
		}
		u := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(b, &u.Object); err != nil {
			return nil, fmt.Errorf("reading %s: %w", n, err)
		}
		out = append(out, u)
	}
	return out, nil
}
