// Package route is nodemesh's request routing: Gateway API HTTPRoute and
// GRPCRoute objects whose parentRefs name a Service (the GAMMA mesh
// profile), compiled into a Table that the source agent asks, per request,
// which rule applies and which backend Service gets the request.
//
// The package is pure logic over net/http values: Compile turns the API
// objects into an immutable Table (refusing what it cannot honour, see
// Compile), Table.Match finds the rule for a request, Rule.Pick draws a
// weighted backend, HeaderFilter.Apply modifies headers, URLRewrite.Apply
// and Redirect.Location do the URLRewrite and RequestRedirect filters,
// Mirror.Sample picks the requests a RequestMirror copies, and RetryPolicy
// and Backoff describe retries. Table.Attachments lists what is attached
// where, for the agent's config dump. Sending requests, endpoints and tunnels belong to
// the caller; the retry budget is package agent/l7/retry.
//
// What is supported and how precedence works is documented for users in
// docs/l7.md.
package route

import (
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"time"
)

// Route kinds.
const (
	KindHTTPRoute = "HTTPRoute"
	KindGRPCRoute = "GRPCRoute"
)

// DefaultBackoff is the wait before the first retry when a route's retry
// stanza names no backoff.
const DefaultBackoff = 25 * time.Millisecond

// ServiceKey names a Service.
type ServiceKey struct {
	Namespace, Name string
}

func (k ServiceKey) String() string { return k.Namespace + "/" + k.Name }

// RouteRef names a route object.
type RouteRef struct {
	Kind, Namespace, Name string
}

func (r RouteRef) String() string { return r.Kind + " " + r.Namespace + "/" + r.Name }

// Problem is a part of a route that Compile could not honour.
type Problem struct {
	Route RouteRef
	Err   error
}

func (p Problem) Error() string { return p.Route.String() + ": " + p.Err.Error() }

// Header is a header name (canonical form) and value.
type Header struct {
	Name, Value string
}

// HeaderFilter is a Gateway API RequestHeaderModifier or
// ResponseHeaderModifier: set (replace), add (append), remove.
type HeaderFilter struct {
	Set    []Header
	Add    []Header
	Remove []string
}

// Empty reports whether the filter changes nothing.
func (f *HeaderFilter) Empty() bool { return len(f.Set) == 0 && len(f.Add) == 0 && len(f.Remove) == 0 }

// Apply modifies h: set, then add, then remove, as the Gateway API orders them.
func (f *HeaderFilter) Apply(h http.Header) {
	for _, s := range f.Set {
		h[s.Name] = []string{s.Value}
	}
	for _, a := range f.Add {
		h[a.Name] = append(h[a.Name], a.Value)
	}
	for _, r := range f.Remove {
		delete(h, r)
	}
}

// RetryPolicy is a compiled HTTPRoute retry stanza.
type RetryPolicy struct {
	// Codes are the response statuses that are retried. Connection
	// failures and resets before a response are always retried.
	Codes []int
	// Attempts is the number of retries after the first try (0: none).
	Attempts int
	// Backoff is the least wait before the first retry.
	Backoff time.Duration
}

// RetryOn reports whether a response with status code is retried.
func (p *RetryPolicy) RetryOn(code int) bool {
	if p == nil {
		return false
	}
	for _, c := range p.Codes {
		if c == code {
			return true
		}
	}
	return false
}

// Backend is one backendRef of a rule.
type Backend struct {
	Service ServiceKey
	Port    uint16
	Weight  int32
	// RequestHeaders and ResponseHeaders are the backendRef's own filters,
	// applied after the rule's.
	RequestHeaders, ResponseHeaders HeaderFilter
	// Rewrite and Mirrors are the backendRef's URLRewrite and
	// RequestMirror filters (nil: none), applied after the rule's.
	Rewrite *URLRewrite
	Mirrors []*Mirror
	// Invalid says why the backend cannot be used; requests that pick it
	// get 500 (as the Gateway API specifies for invalid backendRefs).
	Invalid error
}

// Rule is one rule of a route.
type Rule struct {
	Route RouteRef
	Index int    // position in spec.rules
	Name  string // spec.rules[].name, if any
	GRPC  bool
	// Backends are the weighted backendRefs. None: requests get 500.
	Backends                        []*Backend
	RequestHeaders, ResponseHeaders HeaderFilter
	// Redirect, when set, answers every matching request with a redirect
	// (the rule then has no backends). Rewrite changes the Host and path
	// forwarded; Mirrors send copies of requests elsewhere.
	Redirect *Redirect
	Rewrite  *URLRewrite
	Mirrors  []*Mirror
	// RequestTimeout bounds the whole exchange (all attempts), and
	// BackendTimeout each attempt; 0 means no timeout.
	RequestTimeout, BackendTimeout time.Duration
	// Retry is nil when the rule has no retry stanza.
	Retry *RetryPolicy
	// Refused says why the rule cannot be honoured (an unsupported filter,
	// an invalid timeout); matching requests get 500 rather than a
	// half-applied rule.
	Refused error
	// Matches describe the rule's matches, for listings
	// (nodemeshctl routes).
	Matches []string
}

// Pick draws a backend with probability proportional to its weight. intn
// returns a uniform integer in [0, n) (math/rand/v2's IntN). It returns nil
// when no backend has weight: the request gets 500.
func (r *Rule) Pick(intn func(n int) int) *Backend {
	var total int64
	for _, b := range r.Backends {
		total += int64(b.Weight)
	}
	if total <= 0 {
		return nil
	}
	if len(r.Backends) == 1 {
		return r.Backends[0]
	}
	n := int64(intn(int(total)))
	for _, b := range r.Backends {
		if n < int64(b.Weight) {
			return b
		}
		n -= int64(b.Weight)
	}
	return r.Backends[len(r.Backends)-1]
}

type pathKind uint8

// Path kinds, in precedence order.
const (
	pathExact pathKind = iota
	pathRegexp
	pathPrefix
)

type valueMatch struct {
	name  string
	value string
	re    *regexp.Regexp // nil: exact
}

func (m *valueMatch) matches(v string, ok bool) bool {
	if !ok {
		return false
	}
	if m.re != nil {
		return m.re.MatchString(v)
	}
	return v == m.value
}

// entry is one match of one rule, the unit of precedence.
type entry struct {
	rule       *Rule
	matchIndex int
	created    time.Time
	port       uint16 // the parentRef's port; 0 for every port

	pathKind pathKind
	path     string // exact path, or prefix without trailing slash ("/" for all)
	pathRE   *regexp.Regexp
	method   string
	headers  []valueMatch
	query    []valueMatch

	grpc                    bool
	grpcService, grpcMethod int // lengths of exact service and method names, for precedence
}

func (e *entry) matches(r *http.Request, port uint16, query func() url.Values) bool {
	if e.port != 0 && e.port != port {
		return false
	}
	p := r.URL.Path
	switch e.pathKind {
	case pathExact:
		if p != e.path {
			return false
		}
	case pathPrefix:
		if e.path != "/" && (!strings.HasPrefix(p, e.path) || (len(p) > len(e.path) && p[len(e.path)] != '/')) {
			return false
		}
	case pathRegexp:
		if !e.pathRE.MatchString(p) {
			return false
		}
	}
	if e.method != "" && r.Method != e.method {
		return false
	}
	for i := range e.headers {
		vs := r.Header.Values(e.headers[i].name)
		if !e.headers[i].matches(strings.Join(vs, ","), len(vs) > 0) {
			return false
		}
	}
	if len(e.query) > 0 {
		q := query()
		for i := range e.query {
			vs, ok := q[e.query[i].name]
			v := ""
			if ok && len(vs) > 0 {
				v = vs[0]
			}
			if !e.query[i].matches(v, ok) {
				return false
			}
		}
	}
	return true
}

// Table is the compiled routes of a cluster. It is immutable and safe for
// concurrent use.
type Table struct {
	services    map[ServiceKey]*serviceRoutes
	problems    []Problem
	attachments []Attachment
}

// Attachment is one route attached to one Service, for listings: every
// rule of the route, refused ones included.
type Attachment struct {
	Service ServiceKey
	Port    uint16 // the parentRef's port; 0 for every port
	Route   RouteRef
	// ClientNamespace is set for a consumer route (written in another
	// namespace than the Service's): it applies to clients there only.
	ClientNamespace string
	Rules           []*Rule
}

// Attachments lists the routes attached to Services, sorted by Service,
// port, kind and route.
func (t *Table) Attachments() []Attachment { return t.attachments }

type serviceRoutes struct {
	httpProducer, grpcProducer []*entry
	// Consumer routes by the namespace they were written in.
	httpConsumer, grpcConsumer map[string][]*entry
}

// Problems lists what Compile could not honour, sorted.
func (t *Table) Problems() []Problem { return t.problems }

// Services lists the Services that have routes attached.
func (t *Table) Services() []ServiceKey {
	out := make([]ServiceKey, 0, len(t.services))
	for k := range t.services {
		out = append(out, k)
	}
	return out
}

// Result is what a Table says about a request.
type Result struct {
	// Attached reports whether any route is attached to the Service (and
	// port) for this client. When false, the request goes to the Service
	// itself, unchanged.
	Attached bool
	// Rule is the rule that matched; nil with Attached means no rule
	// matched: answer 404.
	Rule *Rule
}

// IsGRPC reports whether r is a gRPC request (HTTP/2 POST with a gRPC
// content type), for which GRPCRoutes apply.
func IsGRPC(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	return r.Method == http.MethodPost && (ct == "application/grpc" || strings.HasPrefix(ct, "application/grpc+") || strings.HasPrefix(ct, "application/grpc;"))
}

// Match finds the rule for a request from a client in namespace clientNS to
// Service svc on Service port port. Consumer routes written in clientNS win
// over the Service's producer routes; for a gRPC request GRPCRoutes are
// used when any is attached, else HTTPRoutes.
func (t *Table) Match(svc ServiceKey, port uint16, clientNS string, r *http.Request) Result {
	sr := t.services[svc]
	if sr == nil {
		return Result{}
	}
	var q url.Values
	query := func() url.Values {
		if q == nil {
			// Only well-formed pairs count; a malformed one matches nothing.
			q, _ = url.ParseQuery(r.URL.RawQuery)
			if q == nil {
				q = url.Values{}
			}
		}
		return q
	}
	var lists [][]*entry
	if IsGRPC(r) {
		lists = append(lists, sr.grpcConsumer[clientNS], sr.grpcProducer)
	}
	lists = append(lists, sr.httpConsumer[clientNS], sr.httpProducer)
	for _, es := range lists {
		attached := false
		for _, e := range es {
			if e.port != 0 && e.port != port {
				continue
			}
			attached = true
			if e.matches(r, port, query) {
				return Result{Attached: true, Rule: e.rule}
			}
		}
		if attached {
			return Result{Attached: true}
		}
	}
	return Result{}
}
