package route

import (
	"cmp"
	"fmt"
	"strconv"
	"strings"
	"time"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Short descriptions of compiled routes for listings (the agent's
// /config_dump/l7, nodemeshctl routes). They say what the agent does, in
// the Gateway API's words.

func describeHTTPMatch(m *gwv1.HTTPRouteMatch) string {
	var parts []string
	typ, val := gwv1.PathMatchPathPrefix, "/"
	if m.Path != nil {
		if m.Path.Type != nil {
			typ = *m.Path.Type
		}
		if m.Path.Value != nil {
			val = *m.Path.Value
		}
	}
	parts = append(parts, fmt.Sprintf("%s %s", typ, val))
	if m.Method != nil {
		parts = append(parts, "method "+string(*m.Method))
	}
	for _, h := range m.Headers {
		parts = append(parts, describeValue("header", string(h.Name), (*string)(h.Type), h.Value))
	}
	for _, q := range m.QueryParams {
		parts = append(parts, describeValue("query", string(q.Name), (*string)(q.Type), q.Value))
	}
	return strings.Join(parts, ", ")
}

func describeGRPCMatch(m *gwv1.GRPCRouteMatch) string {
	var parts []string
	if mm := m.Method; mm != nil {
		svc, meth := "*", "*"
		if mm.Service != nil && *mm.Service != "" {
			svc = *mm.Service
		}
		if mm.Method != nil && *mm.Method != "" {
			meth = *mm.Method
		}
		typ := gwv1.GRPCMethodMatchExact
		if mm.Type != nil {
			typ = *mm.Type
		}
		parts = append(parts, fmt.Sprintf("method %s /%s/%s", typ, svc, meth))
	}
	for _, h := range m.Headers {
		parts = append(parts, describeValue("header", string(h.Name), (*string)(h.Type), h.Value))
	}
	if len(parts) == 0 {
		return "every call"
	}
	return strings.Join(parts, ", ")
}

func describeValue(what, name string, typ *string, value string) string {
	if typ != nil && *typ == "RegularExpression" {
		return fmt.Sprintf("%s %s~%s", what, name, value)
	}
	return fmt.Sprintf("%s %s=%s", what, name, value)
}

// String names a backend: Service, port and weight, and why it cannot be
// used.
func (b *Backend) String() string {
	s := b.Service.String()
	if b.Port != 0 {
		s += ":" + strconv.Itoa(int(b.Port))
	}
	s += " weight " + strconv.Itoa(int(b.Weight))
	if b.Invalid != nil {
		s += " (invalid: " + b.Invalid.Error() + ")"
	}
	return s
}

// Filters describes what the rule does to requests besides choosing a
// backend: its filters, timeouts and retries.
func (r *Rule) Filters() []string {
	var out []string
	if !r.RequestHeaders.Empty() {
		out = append(out, "RequestHeaderModifier")
	}
	if !r.ResponseHeaders.Empty() {
		out = append(out, "ResponseHeaderModifier")
	}
	if r.Rewrite != nil {
		out = append(out, "URLRewrite "+r.Rewrite.String())
	}
	if r.Redirect != nil {
		out = append(out, "RequestRedirect "+r.Redirect.String())
	}
	for _, m := range r.Mirrors {
		out = append(out, "RequestMirror "+m.String())
	}
	for _, b := range r.Backends {
		if !b.RequestHeaders.Empty() || !b.ResponseHeaders.Empty() || b.Rewrite != nil || len(b.Mirrors) > 0 {
			out = append(out, "backend "+b.Service.Name+": own filters")
		}
	}
	if r.RequestTimeout > 0 || r.BackendTimeout > 0 {
		out = append(out, fmt.Sprintf("timeouts request %s backendRequest %s", durationOrNone(r.RequestTimeout), durationOrNone(r.BackendTimeout)))
	}
	if r.Retry != nil {
		codes := make([]string, len(r.Retry.Codes))
		for i, c := range r.Retry.Codes {
			codes[i] = strconv.Itoa(c)
		}
		out = append(out, fmt.Sprintf("retry %d on [%s] backoff %s", r.Retry.Attempts, strings.Join(codes, " "), r.Retry.Backoff))
	}
	return out
}

func durationOrNone(d time.Duration) string {
	if d == 0 {
		return "none"
	}
	return d.String()
}

func (m *PathModifier) String() string {
	if m.FullSet {
		return "path " + m.Full
	}
	return "prefix " + m.Prefix + " -> " + cmp.Or(strings.TrimSuffix(m.Replace, "/"), "/")
}

func (rw *URLRewrite) String() string {
	var parts []string
	if rw.Hostname != "" {
		parts = append(parts, "host "+rw.Hostname)
	}
	if rw.Path != nil {
		parts = append(parts, rw.Path.String())
	}
	return strings.Join(parts, ", ")
}

func (rd *Redirect) String() string {
	parts := []string{strconv.Itoa(rd.Status)}
	if rd.Scheme != "" {
		parts = append(parts, "scheme "+rd.Scheme)
	}
	if rd.Hostname != "" {
		parts = append(parts, "host "+rd.Hostname)
	}
	if rd.Port != 0 {
		parts = append(parts, "port "+strconv.Itoa(int(rd.Port)))
	}
	if rd.Path != nil {
		parts = append(parts, rd.Path.String())
	}
	return strings.Join(parts, ", ")
}

func (m *Mirror) String() string {
	s := m.Backend.Service.String() + ":" + strconv.Itoa(int(m.Backend.Port))
	if m.Num < m.Den {
		s += fmt.Sprintf(" %d/%d", m.Num, m.Den)
	}
	return s
}
