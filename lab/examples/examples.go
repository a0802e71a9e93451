// Package examples holds the lab specs shipped with nodemesh, embedded so
// that nodemeshctl, the demo and the tests use the same files users read.
package examples

import (
	_ "embed"

	"github.com/nodemesh/nodemesh/lab/spec"
)

// TwoNodesFile is the name of TwoNodes in this directory.
const TwoNodesFile = "lab/examples/two-nodes.yaml"

// TwoNodes is two-nodes.yaml: 2 nodes, 2 namespaces, 5 pods, 2 services.
//
//go:embed two-nodes.yaml
var TwoNodes []byte

// TwoNodesSpec parses TwoNodes.
func TwoNodesSpec() (*spec.Spec, error) { return spec.Parse(TwoNodesFile, TwoNodes) }
