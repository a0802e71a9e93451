// Package yamljson converts one YAML document to JSON the way Kubernetes
// objects should be read: with YAML 1.2 scalars. Unquoted y, n, yes, no, on
// and off stay strings (only true and false are booleans), so a namespace,
// label or name spelt that way keeps its meaning; YAML 1.1 decoders, such
// as the one behind sigs.k8s.io/yaml, turn them into true and false and a
// namespace named "y" into one named "true" without a word.
//
// Every YAML intake of nodemesh uses it: the agent's static manifests and
// `nodemeshctl policy explain --from-files` (agent/k8s), and the lab spec.
// Duplicate keys are an error (which one wins would be a guess), as are
// merge keys; timestamps stay the strings they were written as; aliases
// are expanded within a bound, so a small document cannot expand into a
// huge one.
package yamljson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"

	yaml "go.yaml.in/yaml/v3"
)

// maxNodes bounds the nodes one document may expand to (aliases included).
const maxNodes = 1 << 20

// ToJSON converts one YAML (or JSON) document to JSON. An empty document,
// or one of only comments, is "null".
func ToJSON(doc []byte) ([]byte, error) {
	d := yaml.NewDecoder(bytes.NewReader(doc))
	var root yaml.Node
	if err := d.Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return []byte("null"), nil
		}
		return nil, fmt.Errorf("parsing YAML: %w", err)
	}
	var extra yaml.Node
	if err := d.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("parsing YAML: more than one document (separate them with ---, one per object)")
	}
	c := converter{}
	v, err := c.value(&root, 0)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("converting YAML to JSON: %w", err)
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

type converter struct{ nodes int }

func (c *converter) value(n *yaml.Node, depth int) (any, error) {
	c.nodes++
	if c.nodes > maxNodes || depth > 1000 {
		return nil, fmt.Errorf("line %d: document too large or too deeply nested (aliases expand to more than %d nodes?)", n.Line, maxNodes)
	}
	switch n.Kind {
	case yaml.DocumentNode:
		if len(n.Content) == 0 {
			return nil, nil
		}
		return c.value(n.Content[0], depth+1)
	case yaml.AliasNode:
		return c.value(n.Alias, depth+1)
	case yaml.SequenceNode:
		out := make([]any, 0, len(n.Content))
		for _, e := range n.Content {
			v, err := c.value(e, depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	case yaml.MappingNode:
		out := make(map[string]any, len(n.Content)/2)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, vn := n.Content[i], n.Content[i+1]
			if k.Kind == yaml.AliasNode {
				k = k.Alias
			}
			if k.Kind != yaml.ScalarNode {
				return nil, fmt.Errorf("line %d: a mapping key must be a scalar", k.Line)
			}
			if k.ShortTag() == "!!merge" {
				return nil, fmt.Errorf("line %d: YAML merge keys (<<) are not supported; write the fields out", k.Line)
			}
			if _, dup := out[k.Value]; dup {
				return nil, fmt.Errorf("line %d: key %q appears twice in one mapping", k.Line, k.Value)
			}
			v, err := c.value(vn, depth+1)
			if err != nil {
				return nil, err
			}
			out[k.Value] = v
		}
		return out, nil
	case yaml.ScalarNode:
		return scalar(n)
	}
	return nil, fmt.Errorf("line %d: unsupported YAML node", n.Line)
}

// scalar resolves a scalar with the YAML 1.2 core schema; an explicit tag
// (!!str) is honoured, and timestamps stay strings.
func scalar(n *yaml.Node) (any, error) {
	switch n.ShortTag() {
	case "!!null":
		return nil, nil
	case "!!bool":
		switch strings.ToLower(n.Value) {
		case "true":
			return true, nil
		case "false":
			return false, nil
		}
		// A YAML 1.1 boolean (y, yes, on...) given the !!bool tag
		// explicitly: ambiguous, so refuse rather than guess.
		return nil, fmt.Errorf("line %d: %q is not a boolean (write true or false)", n.Line, n.Value)
	case "!!int":
		v := strings.ReplaceAll(n.Value, "_", "")
		// Decimal unless prefixed (0x, 0o): YAML 1.2 reads 012 as 12.
		base, digits := 10, strings.TrimLeft(v, "+-")
		if len(digits) > 1 && digits[0] == '0' && strings.ContainsAny(digits[1:2], "xXoObB") {
			base = 0
		}
		if i, err := strconv.ParseInt(v, base, 64); err == nil {
			return json.Number(strconv.FormatInt(i, 10)), nil
		}
		if u, err := strconv.ParseUint(v, base, 64); err == nil {
			return json.Number(strconv.FormatUint(u, 10)), nil
		}
		return nil, fmt.Errorf("line %d: integer %q out of range", n.Line, n.Value)
	case "!!float":
		f, err := strconv.ParseFloat(strings.ReplaceAll(n.Value, "_", ""), 64)
		if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			return nil, fmt.Errorf("line %d: %q is not a number JSON can hold", n.Line, n.Value)
		}
		return json.Number(strconv.FormatFloat(f, 'g', -1, 64)), nil
	case "!!binary":
		return nil, fmt.Errorf("line %d: binary scalars are not supported", n.Line)
	}
	return n.Value, nil // !!str, !!timestamp and anything else: the text as written
}
