package spec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"reflect"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nodemesh/nodemesh/agent/k8s/yamljson"
)

// Error is one problem with a spec: where it is and what to do about it.
type Error struct {
	File  string // the spec file, or "<spec>" when parsed from memory
	Field string // e.g. "pods[2].node"; empty for the whole document
	Msg   string // what is wrong
	Fix   string // what to do; may be empty
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	if e.Fix != "" {
		b.WriteString("; ")
		b.WriteString(e.Fix)
	}
	return b.String()
}

// maxSpecBytes bounds what Parse accepts; a lab spec is a few kilobytes.
const maxSpecBytes = 4 << 20

// Load reads, parses and validates the spec file at path.
func Load(path string) (*Spec, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading lab spec: %w", err)
	}
	return Parse(path, data)
}

// Parse parses a YAML (or JSON) lab spec strictly (unknown fields,
// duplicate keys and wrong types are errors), fills in defaults and
// validates it. file only labels errors. On failure the error is an
// *Error or several joined with errors.Join; nothing is half-returned.
func Parse(file string, data []byte) (*Spec, error) {
	if file == "" {
		file = "<spec>"
	}
	if len(data) > maxSpecBytes {
		return nil, &Error{File: file, Msg: fmt.Sprintf("spec is %d bytes, more than the %d allowed", len(data), maxSpecBytes)}
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, &Error{File: file, Msg: "spec is empty", Fix: "see lab/examples/two-nodes.yaml"}
	}
	js, err := yamljson.ToJSON(data)
	if err != nil {
		return nil, &Error{File: file, Msg: "not valid YAML: " + err.Error(), Fix: "fix the syntax (and remove duplicate keys)"}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var raw any
	if err := dec.Decode(&raw); err != nil {
		return nil, &Error{File: file, Msg: "not valid YAML: " + err.Error()}
	}
	if raw == nil {
		return nil, &Error{File: file, Msg: "spec is empty", Fix: "see lab/examples/two-nodes.yaml"}
	}
	if errs := checkShape(file, "", reflect.TypeFor[Spec](), raw, nil); len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	var s Spec
	if err := json.Unmarshal(js, &s); err != nil {
		// checkShape accepted it, so this is a bug in checkShape; still
		// report it rather than panic.
		return nil, &Error{File: file, Msg: "decoding: " + err.Error()}
	}
	s.Default()
	if err := s.Validate(file); err != nil {
		return nil, err
	}
	return &s, nil
}

var intOrStringType = reflect.TypeFor[intstr.IntOrString]()

// checkShape walks the decoded document against the Go type it must fill
// and reports unknown fields and wrong types with their full path, which
// encoding/json's own errors lack.
func checkShape(file, path string, t reflect.Type, v any, errs []error) []error {
	bad := func(msg, fix string) []error {
		return append(errs, &Error{File: file, Field: path, Msg: msg, Fix: fix})
	}
	if v == nil {
		return errs // null: leave the zero value
	}
	if t == intOrStringType {
		switch x := v.(type) {
		case string:
			return errs
		case json.Number:
			if _, err := x.Int64(); err != nil {
				return bad("want a port number or a port name, got "+x.String(), "")
			}
			return errs
		}
		return bad("want a port number or a port name, got "+describe(v), "")
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return bad("want a mapping, got "+describe(v), "")
		}
		fields := jsonFields(t)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			ft, ok := fields[k]
			if !ok {
				known := make([]string, 0, len(fields))
				for name := range fields {
					known = append(known, name)
				}
				sort.Strings(known)
				errs = append(errs, &Error{File: file, Field: join(path, k), Msg: "unknown field",
					Fix: "check the spelling; allowed here: " + strings.Join(known, ", ")})
				continue
			}
			errs = checkShape(file, join(path, k), ft, m[k], errs)
		}
		return errs
	case reflect.Slice:
		l, ok := v.([]any)
		if !ok {
			return bad("want a list, got "+describe(v), "")
		}
		for i, e := range l {
			errs = checkShape(file, fmt.Sprintf("%s[%d]", path, i), t.Elem(), e, errs)
		}
		return errs
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			return bad("want a mapping, got "+describe(v), "")
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			errs = checkShape(file, fmt.Sprintf("%s[%q]", path, k), t.Elem(), m[k], errs)
		}
		return errs
	case reflect.String:
		if _, ok := v.(string); !ok {
			return bad("want a string, got "+describe(v), "quote the value")
		}
		return errs
	case reflect.Int32:
		n, ok := v.(json.Number)
		if !ok {
			return bad("want a number, got "+describe(v), "")
		}
		i, err := n.Int64()
		if err != nil || i < math.MinInt32 || i > math.MaxInt32 {
			return bad("want a whole number, got "+n.String(), "")
		}
		return errs
	}
	return bad("unsupported field type "+t.String(), "")
}

func describe(v any) string {
	switch x := v.(type) {
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	case string:
		return fmt.Sprintf("the string %q", x)
	case json.Number:
		return "the number " + x.String()
	case bool:
		return fmt.Sprintf("the boolean %v (YAML reads yes/no/on/off/true/false as booleans)", x)
	}
	return fmt.Sprintf("%T", v)
}

func join(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

func jsonFields(t reflect.Type) map[string]reflect.Type {
	out := make(map[string]reflect.Type, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}
