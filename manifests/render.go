// Package manifests is nodemesh's Kubernetes install: a kustomize base
// (base/), the CRDs (crds/), the default install (this directory's
// kustomization.yaml, for `kubectl apply -k manifests/`) and the overlays
// lab and production (overlays/), the equivalent Helm chart (helm/nodemesh,
// rendered with Helm's library in the tests), plus the Dockerfile of the
// agent and CA images.
//
// The Go code renders a kustomization with kustomize's own library (krusty),
// exactly as `kubectl apply -k` would, so tests and tools can check and
// apply the same objects a user gets.
package manifests

import (
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Render builds the kustomization in dir (a directory on disk holding a
// kustomization.yaml) and returns its objects in kustomize's output order.
func Render(dir string) ([]*unstructured.Unstructured, error) {
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("rendering kustomization: %w", err)
	}
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("rendering kustomization %s: %w", dir, err)
	}
	var out []*unstructured.Unstructured
	for _, r := range rm.Resources() {
		m, err := r.Map()
		if err != nil {
			return nil, fmt.Errorf("rendering kustomization %s: converting %s: %w", dir, r.CurId(), err)
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
	return out, nil
}
