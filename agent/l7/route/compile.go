package route

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Limits that keep a route table small and its matching cheap whatever the
// API server let through.
const (
	maxRegexp     = 1024 // bytes of one regular expression
	maxAttempts   = 10   // retries of one request
	maxHeaderVals = 64   // headers one filter sets, adds or removes
)

// Compile builds the route table for the HTTPRoutes and GRPCRoutes of the
// cluster. Routes whose parents are not Services are ignored (they belong to
// Gateways). Invalid parts never widen what a route does: a rule that cannot
// be honoured answers 500 (Rule.Refused), a backendRef that cannot be used
// answers 500 for its share of the traffic (Backend.Invalid), and both are
// listed in Table.Problems.
func Compile(httpRoutes []*gwv1.HTTPRoute, grpcRoutes []*gwv1.GRPCRoute) *Table {
	t := &Table{services: map[ServiceKey]*serviceRoutes{}}
	for _, hr := range httpRoutes {
		t.addHTTPRoute(hr)
	}
	for _, gr := range grpcRoutes {
		t.addGRPCRoute(gr)
	}
	for _, sr := range t.services {
		sortEntries(sr.httpProducer)
		sortEntries(sr.grpcProducer)
		for _, es := range sr.httpConsumer {
			sortEntries(es)
		}
		for _, es := range sr.grpcConsumer {
			sortEntries(es)
		}
	}
	slices.SortFunc(t.attachments, func(a, b Attachment) int {
		return cmp.Or(cmp.Compare(a.Service.String(), b.Service.String()), cmp.Compare(a.Port, b.Port),
			cmp.Compare(a.Route.String(), b.Route.String()))
	})
	slices.SortFunc(t.problems, func(a, b Problem) int {
		return cmp.Or(cmp.Compare(a.Route.String(), b.Route.String()), cmp.Compare(a.Err.Error(), b.Err.Error()))
	})
	return t
}

func (t *Table) problem(ref RouteRef, format string, args ...any) {
	t.problems = append(t.problems, Problem{Route: ref, Err: fmt.Errorf(format, args...)})
}

// parent is a Service a route attaches to, and the Service port (0: all).
type parent struct {
	svc  ServiceKey
	port uint16
}

// serviceParents returns the Service parents of a route; parentRefs to
// anything else are not the mesh's business.
func (t *Table) serviceParents(ref RouteRef, refs []gwv1.ParentReference) []parent {
	var out []parent
	for i, pr := range refs {
		group, kind := "gateway.networking.k8s.io", "Gateway"
		if pr.Group != nil {
			group = string(*pr.Group)
		}
		if pr.Kind != nil {
			kind = string(*pr.Kind)
		}
		if kind != "Service" || (group != "" && group != "core") {
			continue
		}
		p := parent{svc: ServiceKey{Namespace: ref.Namespace, Name: string(pr.Name)}}
		if pr.Namespace != nil && *pr.Namespace != "" {
			p.svc.Namespace = string(*pr.Namespace)
		}
		if pr.Port != nil {
			if *pr.Port < 1 || *pr.Port > 65535 {
				t.problem(ref, "spec.parentRefs[%d].port %d: want 1-65535; parent ignored", i, *pr.Port)
				continue
			}
			p.port = uint16(*pr.Port)
		}
		if p.svc.Name == "" {
			t.problem(ref, "spec.parentRefs[%d]: name is empty; parent ignored", i)
			continue
		}
		out = append(out, p)
	}
	return out
}

// attach records the route's entries under each of its Service parents:
// as a producer route in the Service's own namespace, as a consumer route
// (for clients in the route's namespace) elsewhere.
func (t *Table) attach(ref RouteRef, parents []parent, entries []*entry, rules []*Rule, grpc bool) {
	for _, p := range parents {
		a := Attachment{Service: p.svc, Port: p.port, Route: ref, Rules: rules}
		if p.svc.Namespace != ref.Namespace {
			a.ClientNamespace = ref.Namespace
		}
		t.attachments = append(t.attachments, a)
		sr := t.services[p.svc]
		if sr == nil {
			sr = &serviceRoutes{}
			t.services[p.svc] = sr
		}
		es := make([]*entry, len(entries))
		for i, e := range entries {
			c := *e
			c.port = p.port
			es[i] = &c
		}
		switch {
		case p.svc.Namespace == ref.Namespace && grpc:
			sr.grpcProducer = append(sr.grpcProducer, es...)
		case p.svc.Namespace == ref.Namespace:
			sr.httpProducer = append(sr.httpProducer, es...)
		case grpc:
			if sr.grpcConsumer == nil {
				sr.grpcConsumer = map[string][]*entry{}
			}
			sr.grpcConsumer[ref.Namespace] = append(sr.grpcConsumer[ref.Namespace], es...)
		default:
			if sr.httpConsumer == nil {
				sr.httpConsumer = map[string][]*entry{}
			}
			sr.httpConsumer[ref.Namespace] = append(sr.httpConsumer[ref.Namespace], es...)
		}
	}
}

func (t *Table) addHTTPRoute(hr *gwv1.HTTPRoute) {
	ref := RouteRef{Kind: KindHTTPRoute, Namespace: hr.Namespace, Name: hr.Name}
	parents := t.serviceParents(ref, hr.Spec.ParentRefs)
	if len(parents) == 0 {
		return
	}
	var entries []*entry
	var rules []*Rule
	for ri := range hr.Spec.Rules {
		r := &hr.Spec.Rules[ri]
		rule := &Rule{Route: ref, Index: ri}
		rules = append(rules, rule)
		if r.Name != nil {
			rule.Name = string(*r.Name)
		}
		var errs []error
		prefix, hasPrefix := rulePrefix(r.Matches)
		for fi := range r.Filters {
			fs := filterSet{req: &rule.RequestHeaders, resp: &rule.ResponseHeaders, rewrite: &rule.Rewrite, redirect: &rule.Redirect,
				mirrors: &rule.Mirrors, prefix: prefix, hasPrefix: hasPrefix}
			if err := t.compileHTTPFilter(ref, fmt.Sprintf("spec.rules[%d].filters[%d]", ri, fi), &r.Filters[fi], fs); err != nil {
				errs = append(errs, fmt.Errorf("filters[%d]: %w", fi, err))
			}
		}
		if rule.Redirect != nil && len(r.BackendRefs) > 0 {
			errs = append(errs, errors.New("a RequestRedirect filter cannot be used together with backendRefs"))
		}
		if r.Timeouts != nil {
			var err error
			if rule.RequestTimeout, err = parseDurationPtr(r.Timeouts.Request); err != nil {
				errs = append(errs, fmt.Errorf("timeouts.request: %w", err))
			}
			if rule.BackendTimeout, err = parseDurationPtr(r.Timeouts.BackendRequest); err != nil {
				errs = append(errs, fmt.Errorf("timeouts.backendRequest: %w", err))
			}
			if rule.RequestTimeout > 0 && rule.BackendTimeout > rule.RequestTimeout {
				errs = append(errs, fmt.Errorf("timeouts.backendRequest %s is longer than timeouts.request %s", rule.BackendTimeout, rule.RequestTimeout))
			}
		}
		if r.Retry != nil {
			rp, err := compileRetry(r.Retry)
			if err != nil {
				errs = append(errs, fmt.Errorf("retry: %w", err))
			}
			rule.Retry = rp
		}
		for bi := range r.BackendRefs {
			b := &r.BackendRefs[bi]
			be := compileBackendRef(ref, &b.BackendRef)
			for fi := range b.Filters {
				fs := filterSet{req: &be.RequestHeaders, resp: &be.ResponseHeaders, rewrite: &be.Rewrite, mirrors: &be.Mirrors,
					prefix: prefix, hasPrefix: hasPrefix}
				where := fmt.Sprintf("spec.rules[%d].backendRefs[%d].filters[%d]", ri, bi, fi)
				if err := t.compileHTTPFilter(ref, where, &b.Filters[fi], fs); err != nil && be.Invalid == nil {
					be.Invalid = fmt.Errorf("filters[%d]: %w", fi, err)
				}
			}
			if be.Invalid != nil {
				t.problem(ref, "spec.rules[%d].backendRefs[%d]: %v; its share of requests gets 500", ri, bi, be.Invalid)
			}
			rule.Backends = append(rule.Backends, be)
		}
		ms := r.Matches
		if len(ms) == 0 {
			ms = []gwv1.HTTPRouteMatch{{}}
		}
		var rentries []*entry
		for mi := range ms {
			rule.Matches = append(rule.Matches, describeHTTPMatch(&ms[mi]))
			e, err := compileHTTPMatch(&ms[mi])
			if err != nil {
				errs = append(errs, fmt.Errorf("matches[%d]: %w", mi, err))
				continue
			}
			e.rule, e.created, e.matchIndex = rule, hr.CreationTimestamp.Time, mi
			rentries = append(rentries, e)
		}
		if err := errors.Join(errs...); err != nil {
			rule.Refused = err
			t.problem(ref, "spec.rules[%d]: %v; matching requests get 500", ri, err)
			if len(rentries) == 0 {
				// No usable match: the rule cannot be reached, so refusing
				// it cannot widen anything. Keep it out of the table.
				continue
			}
		}
		entries = append(entries, rentries...)
	}
	t.attach(ref, parents, entries, rules, false)
}

func (t *Table) addGRPCRoute(gr *gwv1.GRPCRoute) {
	ref := RouteRef{Kind: KindGRPCRoute, Namespace: gr.Namespace, Name: gr.Name}
	parents := t.serviceParents(ref, gr.Spec.ParentRefs)
	if len(parents) == 0 {
		return
	}
	var entries []*entry
	var rules []*Rule
	for ri := range gr.Spec.Rules {
		r := &gr.Spec.Rules[ri]
		rule := &Rule{Route: ref, Index: ri, GRPC: true}
		rules = append(rules, rule)
		if r.Name != nil {
			rule.Name = string(*r.Name)
		}
		var errs []error
		for fi := range r.Filters {
			if err := compileGRPCFilter(&r.Filters[fi], &rule.RequestHeaders, &rule.ResponseHeaders); err != nil {
				errs = append(errs, fmt.Errorf("filters[%d]: %w", fi, err))
			}
		}
		for bi := range r.BackendRefs {
			b := &r.BackendRefs[bi]
			be := compileBackendRef(ref, &b.BackendRef)
			for fi := range b.Filters {
				if err := compileGRPCFilter(&b.Filters[fi], &be.RequestHeaders, &be.ResponseHeaders); err != nil && be.Invalid == nil {
					be.Invalid = fmt.Errorf("filters[%d]: %w", fi, err)
				}
			}
			if be.Invalid != nil {
				t.problem(ref, "spec.rules[%d].backendRefs[%d]: %v; its share of requests gets 500", ri, bi, be.Invalid)
			}
			rule.Backends = append(rule.Backends, be)
		}
		ms := r.Matches
		if len(ms) == 0 {
			ms = []gwv1.GRPCRouteMatch{{}}
		}
		var rentries []*entry
		for mi := range ms {
			rule.Matches = append(rule.Matches, describeGRPCMatch(&ms[mi]))
			e, err := compileGRPCMatch(&ms[mi])
			if err != nil {
				errs = append(errs, fmt.Errorf("matches[%d]: %w", mi, err))
				continue
			}
			e.rule, e.created, e.matchIndex = rule, gr.CreationTimestamp.Time, mi
			rentries = append(rentries, e)
		}
		if err := errors.Join(errs...); err != nil {
			rule.Refused = err
			t.problem(ref, "spec.rules[%d]: %v; matching requests get 500", ri, err)
			if len(rentries) == 0 {
				continue
			}
		}
		entries = append(entries, rentries...)
	}
	t.attach(ref, parents, entries, rules, true)
}

func compileBackendRef(ref RouteRef, b *gwv1.BackendRef) *Backend {
	be := &Backend{Service: ServiceKey{Namespace: ref.Namespace, Name: string(b.Name)}, Weight: 1}
	if b.Weight != nil {
		be.Weight = *b.Weight
	}
	group, kind := "", "Service"
	if b.Group != nil {
		group = string(*b.Group)
	}
	if b.Kind != nil {
		kind = string(*b.Kind)
	}
	switch {
	case be.Weight < 0 || be.Weight > 1_000_000:
		be.Invalid = fmt.Errorf("weight %d: want 0-1000000", be.Weight)
		be.Weight = 0
	case kind != "Service" || (group != "" && group != "core"):
		be.Invalid = fmt.Errorf("backend %s/%s: only Services are supported", cmp.Or(group, "core"), kind)
	case b.Namespace != nil && string(*b.Namespace) != ref.Namespace:
		// A cross-namespace reference needs a ReferenceGrant, which
		// nodemesh does not read yet: refuse rather than trust it.
		be.Invalid = fmt.Errorf("backend in namespace %q: cross-namespace backendRefs are not supported yet", *b.Namespace)
		be.Service.Namespace = string(*b.Namespace) // for listings; never used
	case b.Name == "":
		be.Invalid = errors.New("backend name is empty")
	case b.Port == nil:
		be.Invalid = errors.New("port is required for a Service backend")
	case *b.Port < 1 || *b.Port > 65535:
		be.Invalid = fmt.Errorf("port %d: want 1-65535", *b.Port)
	default:
		be.Port = uint16(*b.Port)
	}
	return be
}

func compileGRPCFilter(f *gwv1.GRPCRouteFilter, req, resp *HeaderFilter) error {
	switch f.Type {
	case gwv1.GRPCRouteFilterRequestHeaderModifier:
		if f.RequestHeaderModifier == nil {
			return errors.New("type RequestHeaderModifier without requestHeaderModifier")
		}
		return req.merge(f.RequestHeaderModifier)
	case gwv1.GRPCRouteFilterResponseHeaderModifier:
		if f.ResponseHeaderModifier == nil {
			return errors.New("type ResponseHeaderModifier without responseHeaderModifier")
		}
		return resp.merge(f.ResponseHeaderModifier)
	}
	return fmt.Errorf("filter type %q is not supported by nodemesh on a GRPCRoute (supported: RequestHeaderModifier, ResponseHeaderModifier)", f.Type)
}

// merge adds a Gateway API header filter to h. Two filters of one type on a
// rule are refused by the Gateway API's validation; merging them here just
// applies both.
func (h *HeaderFilter) merge(f *gwv1.HTTPHeaderFilter) error {
	if len(f.Set)+len(f.Add)+len(f.Remove) > maxHeaderVals {
		return fmt.Errorf("more than %d header changes", maxHeaderVals)
	}
	conv := func(in []gwv1.HTTPHeader) ([]Header, error) {
		var out []Header
		for _, hd := range in {
			if !httpguts.ValidHeaderFieldName(string(hd.Name)) {
				return nil, fmt.Errorf("header name %q is not a valid HTTP field name", hd.Name)
			}
			if !httpguts.ValidHeaderFieldValue(hd.Value) {
				return nil, fmt.Errorf("header %s: value %q is not a valid HTTP field value", hd.Name, hd.Value)
			}
			if reservedHeader(string(hd.Name)) {
				return nil, fmt.Errorf("header %s is managed by the proxy and cannot be modified", hd.Name)
			}
			out = append(out, Header{Name: http.CanonicalHeaderKey(string(hd.Name)), Value: hd.Value})
		}
		return out, nil
	}
	set, err := conv(f.Set)
	if err != nil {
		return err
	}
	add, err := conv(f.Add)
	if err != nil {
		return err
	}
	h.Set = append(h.Set, set...)
	h.Add = append(h.Add, add...)
	for _, n := range f.Remove {
		if !httpguts.ValidHeaderFieldName(n) {
			return fmt.Errorf("header name %q is not a valid HTTP field name", n)
		}
		if reservedHeader(n) {
			return fmt.Errorf("header %s is managed by the proxy and cannot be removed", n)
		}
		h.Remove = append(h.Remove, http.CanonicalHeaderKey(n))
	}
	return nil
}

// reservedHeader reports headers a filter may not touch: hop-by-hop and
// framing headers, which net/http manages, and Host.
func reservedHeader(name string) bool {
	switch http.CanonicalHeaderKey(name) {
	case "Host", "Connection", "Content-Length", "Transfer-Encoding", "Te", "Trailer", "Upgrade", "Keep-Alive", "Proxy-Connection":
		return true
	}
	return false
}

// durationRE is the Gateway API Duration format (GEP-2257).
var durationRE = regexp.MustCompile(`^([0-9]{1,5}(h|m|s|ms)){1,4}$`)

// ParseDuration parses a Gateway API Duration (GEP-2257), e.g. "1h30m",
// "250ms", "0s".
func ParseDuration(s string) (time.Duration, error) {
	if !durationRE.MatchString(s) {
		return 0, fmt.Errorf("duration %q: want a Gateway API duration such as 10s, 250ms or 1h30m", s)
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("duration %q: %w", s, err)
	}
	return d, nil
}

func parseDurationPtr(d *gwv1.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	return ParseDuration(string(*d))
}

func compileRetry(r *gwv1.HTTPRouteRetry) (*RetryPolicy, error) {
	rp := &RetryPolicy{Attempts: 1, Backoff: DefaultBackoff}
	if r.Attempts != nil {
		if *r.Attempts < 0 || *r.Attempts > maxAttempts {
			return nil, fmt.Errorf("attempts %d: want 0-%d", *r.Attempts, maxAttempts)
		}
		rp.Attempts = *r.Attempts
	}
	if r.Backoff != nil {
		d, err := ParseDuration(string(*r.Backoff))
		if err != nil {
			return nil, fmt.Errorf("backoff: %w", err)
		}
		rp.Backoff = d
	}
	for _, c := range r.Codes {
		if c < 400 || c > 599 {
			return nil, fmt.Errorf("code %d: want 400-599", c)
		}
		rp.Codes = append(rp.Codes, int(c))
	}
	return rp, nil
}

func compileRegexp(what, expr string) (*regexp.Regexp, error) {
	if len(expr) > maxRegexp {
		return nil, fmt.Errorf("%s: regular expression longer than %d bytes", what, maxRegexp)
	}
	re, err := regexp.Compile(`^(?:` + expr + `)$`)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return re, nil
}

func compileHTTPMatch(m *gwv1.HTTPRouteMatch) (*entry, error) {
	e := &entry{pathKind: pathPrefix, path: "/"}
	if m.Path != nil {
		typ := gwv1.PathMatchPathPrefix
		if m.Path.Type != nil {
			typ = *m.Path.Type
		}
		val := "/"
		if m.Path.Value != nil {
			val = *m.Path.Value
		}
		switch typ {
		case gwv1.PathMatchExact, gwv1.PathMatchPathPrefix:
			if !strings.HasPrefix(val, "/") {
				return nil, fmt.Errorf("path %q: must start with /", val)
			}
			if strings.Contains(val, "//") || strings.ContainsAny(val, "?#%") {
				return nil, fmt.Errorf("path %q: must not contain //, ?, # or %%", val)
			}
			e.path = val
			if typ == gwv1.PathMatchExact {
				e.pathKind = pathExact
			} else if len(val) > 1 {
				e.path = strings.TrimSuffix(val, "/")
			}
		case gwv1.PathMatchRegularExpression:
			re, err := compileRegexp("path", val)
			if err != nil {
				return nil, err
			}
			e.pathKind, e.pathRE, e.path = pathRegexp, re, val
		default:
			return nil, fmt.Errorf("path type %q: want Exact, PathPrefix or RegularExpression", typ)
		}
	}
	if m.Method != nil {
		e.method = string(*m.Method)
		if !httpguts.ValidHeaderFieldName(e.method) { // a method is a token
			return nil, fmt.Errorf("method %q is not a valid HTTP method", e.method)
		}
	}
	seen := map[string]bool{}
	for _, h := range m.Headers {
		name := http.CanonicalHeaderKey(string(h.Name))
		if seen[name] { // the Gateway API: only the first of equal names counts
			continue
		}
		seen[name] = true
		typ := gwv1.HeaderMatchExact
		if h.Type != nil {
			typ = *h.Type
		}
		vm, err := compileValueMatch("header "+string(h.Name), string(h.Name), string(typ), h.Value)
		if err != nil {
			return nil, err
		}
		vm.name = name
		e.headers = append(e.headers, vm)
	}
	seenQ := map[string]bool{}
	for _, q := range m.QueryParams {
		if seenQ[string(q.Name)] {
			continue
		}
		seenQ[string(q.Name)] = true
		typ := gwv1.QueryParamMatchExact
		if q.Type != nil {
			typ = *q.Type
		}
		vm, err := compileValueMatch("query parameter "+string(q.Name), "", string(typ), q.Value)
		if err != nil {
			return nil, err
		}
		vm.name = string(q.Name) // query parameter names are case-sensitive
		e.query = append(e.query, vm)
	}
	return e, nil
}

func compileValueMatch(what, headerName, typ, value string) (valueMatch, error) {
	if headerName != "" && !httpguts.ValidHeaderFieldName(headerName) {
		return valueMatch{}, fmt.Errorf("%s: not a valid HTTP field name", what)
	}
	switch typ {
	case "Exact":
		return valueMatch{value: value}, nil
	case "RegularExpression":
		re, err := compileRegexp(what, value)
		if err != nil {
			return valueMatch{}, err
		}
		return valueMatch{value: value, re: re}, nil
	}
	return valueMatch{}, fmt.Errorf("%s: type %q: want Exact or RegularExpression", what, typ)
}

func compileGRPCMatch(m *gwv1.GRPCRouteMatch) (*entry, error) {
	// A gRPC method is the path /<service>/<method>.
	e := &entry{pathKind: pathPrefix, path: "/", grpc: true}
	if mm := m.Method; mm != nil {
		typ := gwv1.GRPCMethodMatchExact
		if mm.Type != nil {
			typ = *mm.Type
		}
		svc, meth := "", ""
		if mm.Service != nil {
			svc = *mm.Service
		}
		if mm.Method != nil {
			meth = *mm.Method
		}
		if svc == "" && meth == "" {
			return nil, errors.New("method: one of service and method is required")
		}
		switch typ {
		case gwv1.GRPCMethodMatchExact:
			if strings.ContainsAny(svc, "/ ") || strings.ContainsAny(meth, "/ ") {
				return nil, fmt.Errorf("method: service %q and method %q must not contain / or spaces", svc, meth)
			}
			svcRE, methRE := regexp.QuoteMeta(svc), regexp.QuoteMeta(meth)
			if svc == "" {
				svcRE = `[^/]+`
			}
			if meth == "" {
				methRE = `[^/]+`
			}
			e.pathKind = pathRegexp
			e.pathRE = regexp.MustCompile(`^/` + svcRE + `/` + methRE + `$`)
		case gwv1.GRPCMethodMatchRegularExpression:
			if svc == "" {
				svc = `[^/]+`
			}
			if meth == "" {
				meth = `[^/]+`
			}
			sre, err := compileRegexp("method.service", svc)
			if err != nil {
				return nil, err
			}
			mre, err := compileRegexp("method.method", meth)
			if err != nil {
				return nil, err
			}
			e.pathKind = pathRegexp
			e.pathRE = regexp.MustCompile(`^/(?:` + strings.TrimSuffix(strings.TrimPrefix(sre.String(), "^"), "$") + `)/(?:` + strings.TrimSuffix(strings.TrimPrefix(mre.String(), "^"), "$") + `)$`)
		default:
			return nil, fmt.Errorf("method type %q: want Exact or RegularExpression", typ)
		}
		e.grpcService, e.grpcMethod = len(svc), len(meth)
		if typ == gwv1.GRPCMethodMatchRegularExpression {
			// Precedence counts only exact characters.
			e.grpcService, e.grpcMethod = 0, 0
		}
		e.path = "/" + svc + "/" + meth
	}
	seen := map[string]bool{}
	for _, h := range m.Headers {
		name := http.CanonicalHeaderKey(string(h.Name))
		if seen[name] {
			continue
		}
		seen[name] = true
		typ := gwv1.GRPCHeaderMatchExact
		if h.Type != nil {
			typ = *h.Type
		}
		vm, err := compileValueMatch("header "+string(h.Name), string(h.Name), string(typ), h.Value)
		if err != nil {
			return nil, err
		}
		vm.name = name
		e.headers = append(e.headers, vm)
	}
	return e, nil
}

// sortEntries orders entries by the Gateway API's precedence: the most
// specific match first, then the oldest route, then namespace/name, then
// the rule's and the match's position.
func sortEntries(es []*entry) {
	slices.SortStableFunc(es, func(a, b *entry) int {
		if a.grpc {
			if c := cmp.Compare(b.grpcService, a.grpcService); c != 0 {
				return c
			}
			if c := cmp.Compare(b.grpcMethod, a.grpcMethod); c != 0 {
				return c
			}
		} else {
			if c := cmp.Compare(a.pathKind, b.pathKind); c != 0 {
				return c
			}
			if a.pathKind != pathExact {
				if c := cmp.Compare(len(b.path), len(a.path)); c != 0 {
					return c
				}
			}
			if c := cmp.Compare(boolInt(b.method != ""), boolInt(a.method != "")); c != 0 {
				return c
			}
		}
		if c := cmp.Compare(len(b.headers), len(a.headers)); c != 0 {
			return c
		}
		if c := cmp.Compare(len(b.query), len(a.query)); c != 0 {
			return c
		}
		if c := a.created.Compare(b.created); c != 0 {
			return c
		}
		if c := cmp.Compare(a.rule.Route.Namespace+"/"+a.rule.Route.Name, b.rule.Route.Namespace+"/"+b.rule.Route.Name); c != 0 {
			return c
		}
		if c := cmp.Compare(a.rule.Index, b.rule.Index); c != 0 {
			return c
		}
		return cmp.Compare(a.matchIndex, b.matchIndex)
	})
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
