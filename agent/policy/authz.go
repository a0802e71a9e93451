package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/nodemesh/nodemesh/agent/l7/authz"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// ErrL7Unsupported is wrapped by the errors that refuse the fields of an
// AuthorizationPolicy nodemesh does not enforce (requestPrincipals, JWT;
// remoteIpBlocks, X-Forwarded-For): a policy that says more than nodemesh
// can check must not be half-enforced silently.
var ErrL7Unsupported = errors.New("is not enforced by nodemesh")

// authzPolicy is a compiled AuthorizationPolicy.
type authzPolicy struct {
	ref      PolicyRef
	action   v1alpha1.Action
	selector labels.Selector // nil: every workload in scope
	rules    []azRule
	refused  error
}

type azRule struct {
	from []azSource // nil: any source
	to   []azOp     // nil: any operation
	// when are the rule's request-header conditions (L7).
	when []authz.Condition
	// l7 is true when a to[].operation or when uses L7 fields: the rule
	// can only be decided on a request (see l7Eval).
	l7 bool
}

type azSource struct {
	principals, notPrincipals []strMatch
	namespaces, notNamespaces []strMatch
	ipBlocks, notIPBlocks     []netip.Prefix
}

type azOp struct {
	ports, notPorts []uint16
	http            *authz.Operation // methods, paths, hosts; nil: none
}

// strMatch is Istio's string match: exact, "*" (any non-empty), "prefix*", "*suffix".
type strMatch struct {
	kind  byte // '=', '*', 'p', 's'
	value string
}

func (m strMatch) matches(s string) bool {
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

func compileStrMatch(v string) (strMatch, error) {
	switch {
	case v == "":
		return strMatch{}, errors.New("empty value")
	case v == "*":
		return strMatch{kind: '*'}, nil
	case strings.Count(v, "*") > 1 || (strings.Contains(v, "*") && !strings.HasPrefix(v, "*") && !strings.HasSuffix(v, "*")):
		return strMatch{}, fmt.Errorf("%q: only a single leading or trailing * is supported", v)
	case strings.HasSuffix(v, "*"):
		return strMatch{kind: 'p', value: strings.TrimSuffix(v, "*")}, nil
	case strings.HasPrefix(v, "*"):
		return strMatch{kind: 's', value: strings.TrimPrefix(v, "*")}, nil
	}
	return strMatch{kind: '=', value: v}, nil
}

// compilePrincipal accepts a SPIFFE ID ("spiffe://td/ns/x/sa/y") or Istio's
// form without the scheme ("td/ns/x/sa/y"); both match the same peer.
// Matching is done against the ID without "spiffe://".
func compilePrincipal(v string) (strMatch, error) {
	m, err := compileStrMatch(strings.TrimPrefix(v, "spiffe://"))
	if err != nil {
		return m, err
	}
	if m.kind == '=' && !strings.Contains(m.value, "/") {
		return m, fmt.Errorf("%q is not a SPIFFE ID (want spiffe://<trust-domain>/ns/<ns>/sa/<sa> or <trust-domain>/ns/<ns>/sa/<sa>)", v)
	}
	return m, nil
}

func compileAuthorizationPolicy(ap *v1alpha1.AuthorizationPolicy) (*authzPolicy, error) {
	c := &authzPolicy{ref: PolicyRef{Kind: KindAuthorizationPolicy, Namespace: ap.Namespace, Name: ap.Name}}
	c.action = ap.Spec.Action
	if c.action == "" {
		c.action = v1alpha1.ActionAllow
	}
	err := c.compile(ap)
	if err != nil {
		c.refused = err
		c.rules = nil
		// Fail closed. A refused ALLOW (or unknown action) still selects its
		// workloads and matches nothing, so those workloads accept only what
		// another ALLOW policy matches. A refused DENY or CUSTOM denies every
		// connection to the workloads it selects. A refused AUDIT is inert.
		switch c.action {
		case v1alpha1.ActionDeny, v1alpha1.ActionCustom:
			c.action = v1alpha1.ActionDeny
			c.rules = []azRule{{}}
		case v1alpha1.ActionAudit:
		default:
			c.action = v1alpha1.ActionAllow
		}
	}
	return c, err
}

func (c *authzPolicy) compile(ap *v1alpha1.AuthorizationPolicy) error {
	if ap.Namespace == "" {
		return errors.New("metadata.namespace is empty")
	}
	if ap.Name == "" {
		return errors.New("metadata.name is empty")
	}
	spec := &ap.Spec
	if spec.Selector != nil {
		sel, err := compileMatchLabels(spec.Selector.MatchLabels)
		if err != nil {
			return fmt.Errorf("spec.selector: %w", err)
		}
		c.selector = sel
	}
	switch c.action {
	case v1alpha1.ActionAllow, v1alpha1.ActionDeny, v1alpha1.ActionAudit:
	case v1alpha1.ActionCustom:
		return errors.New("spec.action CUSTOM (external authorization) is not supported by nodemesh; use ALLOW, DENY or AUDIT")
	default:
		return fmt.Errorf("spec.action %q: want ALLOW, DENY or AUDIT", c.action)
	}
	if spec.Provider != nil {
		return errors.New("spec.provider is only meaningful with action CUSTOM, which nodemesh does not support")
	}
	if spec.TargetRef != nil || len(spec.TargetRefs) > 0 {
		return errors.New("spec.targetRef/targetRefs (Gateway API attachment) is not supported; use spec.selector")
	}
	for i := range spec.Rules {
		r, err := compileAZRule(&spec.Rules[i])
		if err != nil {
			return fmt.Errorf("spec.rules[%d]: %w", i, err)
		}
		c.rules = append(c.rules, r)
	}
	return nil
}

func refuseL7(field string, vals []string) error {
	if len(vals) == 0 {
		return nil
	}
	return fmt.Errorf("%s %w; remove the field or use principals, namespaces, ipBlocks, ports, or L7 fields (methods, paths, hosts, request.headers conditions) on an opted-in Service", field, ErrL7Unsupported)
}

func compileAZRule(r *v1alpha1.Rule) (azRule, error) {
	var out azRule
	if len(r.When) > 0 {
		w, err := authz.CompileConditions(r.When)
		if err != nil {
			return out, fmt.Errorf("when%w", err)
		}
		out.when, out.l7 = w, true
	}
	for i := range r.From {
		s := &r.From[i].Source
		for _, f := range []struct {
			name string
			vals []string
		}{
			{"requestPrincipals", s.RequestPrincipals}, {"notRequestPrincipals", s.NotRequestPrincipals},
			{"remoteIpBlocks", s.RemoteIPBlocks}, {"notRemoteIpBlocks", s.NotRemoteIPBlocks},
		} {
			if err := refuseL7(fmt.Sprintf("from[%d].source.%s", i, f.name), f.vals); err != nil {
				return out, err
			}
		}
		if len(s.ServiceAccounts) > 0 || len(s.NotServiceAccounts) > 0 {
			return out, fmt.Errorf("from[%d].source.serviceAccounts/notServiceAccounts is not supported yet; use principals (spiffe://<td>/ns/<ns>/sa/<sa>)", i)
		}
		var src azSource
		var err error
		if src.principals, err = compileList(s.Principals, compilePrincipal); err != nil {
			return out, fmt.Errorf("from[%d].source.principals: %w", i, err)
		}
		if src.notPrincipals, err = compileList(s.NotPrincipals, compilePrincipal); err != nil {
			return out, fmt.Errorf("from[%d].source.notPrincipals: %w", i, err)
		}
		if src.namespaces, err = compileList(s.Namespaces, compileStrMatch); err != nil {
			return out, fmt.Errorf("from[%d].source.namespaces: %w", i, err)
		}
		if src.notNamespaces, err = compileList(s.NotNamespaces, compileStrMatch); err != nil {
			return out, fmt.Errorf("from[%d].source.notNamespaces: %w", i, err)
		}
		if src.ipBlocks, err = compileList(s.IPBlocks, parseIPOrCIDR); err != nil {
			return out, fmt.Errorf("from[%d].source.ipBlocks: %w", i, err)
		}
		if src.notIPBlocks, err = compileList(s.NotIPBlocks, parseIPOrCIDR); err != nil {
			return out, fmt.Errorf("from[%d].source.notIpBlocks: %w", i, err)
		}
		out.from = append(out.from, src)
	}
	for i := range r.To {
		op := &r.To[i].Operation
		var o azOp
		var err error
		if o.http, err = authz.CompileOperation(op); err != nil {
			return out, fmt.Errorf("to[%d].operation.%w", i, err)
		}
		out.l7 = out.l7 || o.http != nil
		if o.ports, err = compileList(op.Ports, parsePort); err != nil {
			return out, fmt.Errorf("to[%d].operation.ports: %w", i, err)
		}
		if o.notPorts, err = compileList(op.NotPorts, parsePort); err != nil {
			return out, fmt.Errorf("to[%d].operation.notPorts: %w", i, err)
		}
		out.to = append(out.to, o)
	}
	return out, nil
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

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("port %q: want a number 1-65535 (named ports are not supported in AuthorizationPolicy)", s)
	}
	return uint16(n), nil
}

// parseIPOrCIDR accepts "10.0.0.1" (a single address) or "10.0.0.0/8".
func parseIPOrCIDR(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(strings.TrimSpace(s))
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q: want an IP address or CIDR", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return parseCIDR(s)
}

// peerIdentity is what a source presents to AuthorizationPolicy.
type peerIdentity struct {
	principal string // without "spiffe://"; "" for plaintext
	namespace string // from the principal's /ns/<ns>/ path; "" for plaintext
	ip        netip.Addr
}

func identityOf(principal string, ip netip.Addr) peerIdentity {
	id := peerIdentity{ip: ip}
	if principal == "" {
		return id
	}
	id.principal = strings.TrimPrefix(principal, "spiffe://")
	// td/ns/<ns>/sa/<sa>
	parts := strings.Split(id.principal, "/")
	if len(parts) == 5 && parts[1] == "ns" && parts[3] == "sa" {
		id.namespace = parts[2]
	}
	return id
}

// matches reports whether the rule matches. unknownNot is the value a
// not-field on an identity attribute (notPrincipals, notNamespaces) takes when
// the source has no identity (plaintext): false for ALLOW (nothing is granted
// on an unknown identity), true for DENY (an unknown identity is not proof
// that the source is exempt). Positive identity fields never match plaintext.
func (r *azRule) matches(id *peerIdentity, port uint16, unknownNot bool, l7 *l7Eval) bool {
	if len(r.when) > 0 {
		if l7.req == nil {
			if !l7.unknown {
				return false
			}
		} else {
			for i := range r.when {
				if !r.when[i].Matches(l7.req) {
					return false
				}
			}
		}
	}
	if r.from != nil {
		ok := false
		for i := range r.from {
			if r.from[i].matches(id, unknownNot) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if r.to != nil {
		ok := false
		for i := range r.to {
			if r.to[i].matches(port, l7) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

func (s *azSource) matches(id *peerIdentity, unknownNot bool) bool {
	if s.principals != nil && !anyMatch(s.principals, id.principal) {
		return false
	}
	if s.namespaces != nil && !anyMatch(s.namespaces, id.namespace) {
		return false
	}
	if s.notPrincipals != nil {
		if id.principal == "" {
			if !unknownNot {
				return false
			}
		} else if anyMatch(s.notPrincipals, id.principal) {
			return false
		}
	}
	if s.notNamespaces != nil {
		if id.namespace == "" {
			if !unknownNot {
				return false
			}
		} else if anyMatch(s.notNamespaces, id.namespace) {
			return false
		}
	}
	if s.ipBlocks != nil && !prefixContains(s.ipBlocks, id.ip) {
		return false
	}
	if s.notIPBlocks != nil && prefixContains(s.notIPBlocks, id.ip) {
		return false
	}
	return true
}

func anyMatch(ms []strMatch, v string) bool {
	if v == "" {
		return false
	}
	for _, m := range ms {
		if m.matches(v) {
			return true
		}
	}
	return false
}

func prefixContains(ps []netip.Prefix, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	for _, p := range ps {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

func (o *azOp) matches(port uint16, l7 *l7Eval) bool {
	if o.ports != nil && !containsPort(o.ports, port) {
		return false
	}
	if o.notPorts != nil && containsPort(o.notPorts, port) {
		return false
	}
	if o.http != nil {
		if l7.req == nil {
			return l7.unknown
		}
		return o.http.Matches(l7.req)
	}
	return true
}

func containsPort(ps []uint16, p uint16) bool {
	for _, x := range ps {
		if x == p {
			return true
		}
	}
	return false
}

// l7Eval is how a rule's L7 part (operation methods, paths and hosts, and
// request-header conditions) is evaluated. With a request, it is matched.
// Without one, it is unknown and takes the value unknown, chosen so that
// not knowing never widens access:
//
//   - a connection that is not handled at L7 (a Service that did not opt
//     in, inbound plaintext, traffic that turned out not to be HTTP): ALLOW
//     and AUDIT rules with L7 fields match nothing, DENY rules with L7
//     fields match when their L4 fields do (the connection is denied);
//   - a connection handled at L7, before its requests: ALLOW rules match
//     on their L4 fields (each request is then decided in full), DENY and
//     AUDIT rules with L7 fields wait for the requests.
type l7Eval struct {
	req     *authz.Request
	unknown bool
}

func newL7Eval(action v1alpha1.Action, handledAtL7 bool, req *authz.Request) *l7Eval {
	if req != nil {
		return &l7Eval{req: req}
	}
	if handledAtL7 {
		return &l7Eval{unknown: action == v1alpha1.ActionAllow}
	}
	return &l7Eval{unknown: action == v1alpha1.ActionDeny}
}
