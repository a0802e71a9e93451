package authz

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// StringMatch is Istio's string match: exact, "*" (any non-empty value),
// "prefix*" or "*suffix".
type StringMatch struct {
	kind  byte // '=', '*', 'p', 's'
	value string
}

// CompileStringMatch parses an Istio string match. An empty value and a
// "*" anywhere but at one end are refused.
func CompileStringMatch(v string) (StringMatch, error) {
	switch {
	case v == "":
		return StringMatch{}, errors.New("empty value")
	case v == "*":
		return StringMatch{kind: '*'}, nil
	case strings.Count(v, "*") > 1 || (strings.Contains(v, "*") && !strings.HasPrefix(v, "*") && !strings.HasSuffix(v, "*")):
		return StringMatch{}, fmt.Errorf("%q: only a single leading or trailing * is supported", v)
	case strings.HasSuffix(v, "*"):
		return StringMatch{kind: 'p', value: strings.TrimSuffix(v, "*")}, nil
	case strings.HasPrefix(v, "*"):
		return StringMatch{kind: 's', value: strings.TrimPrefix(v, "*")}, nil
	}
	return StringMatch{kind: '=', value: v}, nil
}

// Exact reports whether the match is an exact value, and the value.
func (m StringMatch) Exact() (string, bool) { return m.value, m.kind == '=' }

// Matches reports whether s matches.
func (m StringMatch) Matches(s string) bool {
	switch m.kind {
	case '*':
		return s != ""
	case 'p':
		return strings.HasPrefix(s, m.value)
	case 's':
		return strings.HasSuffix(s, m.value)
	}
	return s == m.value
}

func (m StringMatch) String() string {
	switch m.kind {
	case '*':
		return "*"
	case 'p':
		return m.value + "*"
	case 's':
		return "*" + m.value
	}
	return m.value
}

// AnyMatch reports whether any of ms matches s.
func AnyMatch(ms []StringMatch, s string) bool {
	for _, m := range ms {
		if m.Matches(s) {
			return true
		}
	}
	return false
}

// Operation is the L7 part of an AuthorizationPolicy operation: methods,
// paths and hosts and their not- forms. All set fields must match.
type Operation struct {
	Methods, NotMethods []StringMatch
	Paths, NotPaths     []StringMatch
	Hosts, NotHosts     []hostMatch
}

// HasL7 reports whether an operation uses any L7 field.
func HasL7(op *v1alpha1.Operation) bool {
	return len(op.Methods)+len(op.NotMethods)+len(op.Paths)+len(op.NotPaths)+len(op.Hosts)+len(op.NotHosts) > 0
}

// CompileOperation compiles the L7 fields of op; nil when it has none.
func CompileOperation(op *v1alpha1.Operation) (*Operation, error) {
	if !HasL7(op) {
		return nil, nil
	}
	o := &Operation{}
	var err error
	if o.Methods, err = compileList(op.Methods, compileMethod); err != nil {
		return nil, fmt.Errorf("methods: %w", err)
	}
	if o.NotMethods, err = compileList(op.NotMethods, compileMethod); err != nil {
		return nil, fmt.Errorf("notMethods: %w", err)
	}
	if o.Paths, err = compileList(op.Paths, compilePath); err != nil {
		return nil, fmt.Errorf("paths: %w", err)
	}
	if o.NotPaths, err = compileList(op.NotPaths, compilePath); err != nil {
		return nil, fmt.Errorf("notPaths: %w", err)
	}
	if o.Hosts, err = compileList(op.Hosts, compileHost); err != nil {
		return nil, fmt.Errorf("hosts: %w", err)
	}
	if o.NotHosts, err = compileList(op.NotHosts, compileHost); err != nil {
		return nil, fmt.Errorf("notHosts: %w", err)
	}
	return o, nil
}

// Matches reports whether r matches every set field. A nil Operation
// matches every request.
func (o *Operation) Matches(r *Request) bool {
	if o == nil {
		return true
	}
	if o.Methods != nil && !AnyMatch(o.Methods, r.Method) {
		return false
	}
	if o.NotMethods != nil && AnyMatch(o.NotMethods, r.Method) {
		return false
	}
	if o.Paths != nil && !AnyMatch(o.Paths, r.Path) {
		return false
	}
	if o.NotPaths != nil && AnyMatch(o.NotPaths, r.Path) {
		return false
	}
	if o.Hosts != nil && !anyHost(o.Hosts, r) {
		return false
	}
	if o.NotHosts != nil && anyHost(o.NotHosts, r) {
		return false
	}
	return true
}

func compileList[T any](vals []string, f func(string) (T, error)) ([]T, error) {
	if len(vals) == 0 {
		return nil, nil
	}
	out := make([]T, 0, len(vals))
	for i, v := range vals {
		c, err := f(v)
		if err != nil {
			return nil, fmt.Errorf("[%d]: %w", i, err)
		}
		out = append(out, c)
	}
	return out, nil
}

func compileMethod(v string) (StringMatch, error) {
	m, err := CompileStringMatch(v)
	if err != nil {
		return m, err
	}
	if m.value != "" && !httpguts.ValidHeaderFieldName(m.value) { // a method is a token
		return m, fmt.Errorf("%q is not an HTTP method", v)
	}
	return m, nil
}

// compilePath refuses patterns that no normalised path can match, so a
// policy never looks stricter than it is.
func compilePath(v string) (StringMatch, error) {
	if strings.ContainsAny(v, "{}") {
		return StringMatch{}, fmt.Errorf("%q: path templates ({*}, {**}) are not supported; use a prefix (/api/*) or suffix (*.png)", v)
	}
	m, err := CompileStringMatch(v)
	if err != nil {
		return m, err
	}
	if strings.ContainsAny(v, "?#") {
		return m, fmt.Errorf("%q: paths are matched without the query; remove ? and #", v)
	}
	if strings.Contains(v, "%") {
		return m, fmt.Errorf("%q: paths are matched decoded; write the characters, not %%-escapes", v)
	}
	if m.kind == '=' || m.kind == 'p' {
		if !strings.HasPrefix(m.value, "/") && m.value != "" {
			return m, fmt.Errorf("%q: a path starts with /", v)
		}
	}
	if strings.Contains(m.value, "//") || strings.Contains(m.value+"/", "/./") || strings.Contains(m.value+"/", "/../") || strings.Contains(m.value, "\\") {
		return m, fmt.Errorf("%q: paths are matched normalised (no //, . or .. segments, or \\), so this never matches", v)
	}
	return m, nil
}

// hostMatch matches the host without port, or with it when the pattern
// names a port.
type hostMatch struct {
	m        StringMatch
	withPort bool
}

func compileHost(v string) (hostMatch, error) {
	lv := strings.TrimSuffix(strings.ToLower(v), ".")
	m, err := CompileStringMatch(lv)
	if err != nil {
		return hostMatch{}, err
	}
	withPort := strings.Count(lv, ":") == 1
	if strings.HasPrefix(lv, "[") {
		withPort = strings.Contains(lv, "]:")
		if !withPort {
			lv = strings.TrimSuffix(strings.TrimPrefix(lv, "["), "]")
			if m, err = CompileStringMatch(lv); err != nil {
				return hostMatch{}, err
			}
		}
	}
	return hostMatch{m: m, withPort: withPort}, nil
}

func anyHost(hs []hostMatch, r *Request) bool {
	for _, h := range hs {
		v := r.Host
		if h.withPort {
			v = r.HostPort
		}
		if h.m.Matches(v) {
			return true
		}
	}
	return false
}

// Condition is a compiled `when` condition on a request header.
type Condition struct {
	Header            string // canonical name
	Values, NotValues []StringMatch
}

// headerKeyPrefix is the only condition key nodemesh supports.
const headerKeyPrefix = "request.headers["

// CompileConditions compiles `when` conditions. Only request.headers[NAME]
// keys are supported; headers a client can forge about the path it took
// (Forwarded, X-Forwarded-*, X-Real-IP, baggage) are refused, and so are
// headers that the operation fields cover (Host, :authority, ...).
func CompileConditions(when []v1alpha1.Condition) ([]Condition, error) {
	var out []Condition
	for i, c := range when {
		if !strings.HasPrefix(c.Key, headerKeyPrefix) || !strings.HasSuffix(c.Key, "]") {
			return nil, fmt.Errorf("[%d].key %q: nodemesh supports only request.headers[<name>] conditions; use from.source for identities and addresses, to.operation for ports, methods, paths and hosts", i, c.Key)
		}
		name := c.Key[len(headerKeyPrefix) : len(c.Key)-1]
		if !httpguts.ValidHeaderFieldName(name) {
			return nil, fmt.Errorf("[%d].key %q: %q is not a valid header name", i, c.Key, name)
		}
		lname := strings.ToLower(name)
		switch {
		case lname == "forwarded" || strings.HasPrefix(lname, "x-forwarded-") || lname == "x-real-ip" || lname == "baggage":
			return nil, fmt.Errorf("[%d].key %q: the client can set %s to anything, so it never decides access; use from.source (principals, ipBlocks)", i, c.Key, name)
		case lname == "host":
			return nil, fmt.Errorf("[%d].key %q: use to.operation.hosts", i, c.Key)
		}
		if len(c.Values) == 0 && len(c.NotValues) == 0 {
			return nil, fmt.Errorf("[%d]: values or notValues is required", i)
		}
		cond := Condition{Header: http.CanonicalHeaderKey(name)}
		var err error
		if cond.Values, err = compileList(c.Values, CompileStringMatch); err != nil {
			return nil, fmt.Errorf("[%d].values: %w", i, err)
		}
		if cond.NotValues, err = compileList(c.NotValues, CompileStringMatch); err != nil {
			return nil, fmt.Errorf("[%d].notValues: %w", i, err)
		}
		out = append(out, cond)
	}
	return out, nil
}

// Matches reports whether r satisfies the condition. An absent header has
// the empty value: values never match it, notValues always do (as Envoy's
// inverted header matchers).
func (c *Condition) Matches(r *Request) bool {
	v := ""
	if vs := r.Header[c.Header]; len(vs) > 0 {
		v = vs[0]
	}
	if c.Values != nil && !AnyMatch(c.Values, v) {
		return false
	}
	if c.NotValues != nil && AnyMatch(c.NotValues, v) {
		return false
	}
	return true
}
