package route

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// maxPathValue bounds a path a rewrite or redirect writes (the Gateway
// API's own limit).
const maxPathValue = 1024

// PathModifier is a compiled Gateway API HTTPPathModifier.
type PathModifier struct {
	// Full, when FullSet, replaces the whole path (ReplaceFullPath).
	Full    string
	FullSet bool
	// Prefix is the rule's PathPrefix match (without a trailing slash, "/"
	// for all) and Replace what takes its place (ReplacePrefixMatch).
	Prefix, Replace string
}

// Apply returns path modified. For ReplacePrefixMatch, path is one the
// rule's PathPrefix match matched (whole segments), so it starts with
// Prefix; the Gateway API's table applies: a trailing slash of Replace is
// ignored, and an empty result is "/".
func (m *PathModifier) Apply(path string) string {
	if m.FullSet {
		return m.Full
	}
	rest := path
	if m.Prefix != "/" {
		rest = strings.TrimPrefix(path, m.Prefix)
	}
	out := strings.TrimSuffix(m.Replace, "/") + rest
	if out == "" {
		return "/"
	}
	if out[0] != '/' {
		out = "/" + out
	}
	return out
}

// URLRewrite is a compiled URLRewrite filter: the request goes on to the
// backend with another Host and/or path.
type URLRewrite struct {
	Hostname string // "" keeps the request's Host
	Path     *PathModifier
}

// Apply rewrites r, which the caller owns (its URL is modified in place).
// The query is kept.
func (rw *URLRewrite) Apply(r *http.Request) {
	if rw.Hostname != "" {
		r.Host = rw.Hostname
	}
	if rw.Path != nil {
		r.URL.Path = rw.Path.Apply(r.URL.Path)
		r.URL.RawPath = ""
	}
}

// Redirect is a compiled RequestRedirect filter: the agent answers the
// request itself with Status and a Location.
type Redirect struct {
	Scheme   string // "" keeps the request's (http: the mesh carries plaintext HTTP)
	Hostname string // "" keeps the request's Host, without its port
	Port     uint16 // 0: derived, as Location explains
	Path     *PathModifier
	Status   int // 301 or 302
}

// Location is the redirect's target for r, which arrived on the Service
// port listenerPort (the mesh's "listener"); defaultHost names the Service
// for a request without a Host. As the Gateway API specifies: without a
// port, a scheme set by the filter brings its well-known port and no
// scheme keeps the listener port; port 80 with http and 443 with https
// are left out. The query is kept.
func (rd *Redirect) Location(r *http.Request, listenerPort uint16, defaultHost string) string {
	scheme := rd.Scheme
	if scheme == "" {
		scheme = "http"
	}
	host := rd.Hostname
	if host == "" {
		host = hostOnly(r.Host)
	}
	if host == "" {
		host = defaultHost
	}
	port := rd.Port
	if port == 0 {
		switch rd.Scheme {
		case "http":
			port = 80
		case "https":
			port = 443
		default:
			port = listenerPort
		}
	}
	if port != 0 && !(scheme == "http" && port == 80) && !(scheme == "https" && port == 443) {
		host = net.JoinHostPort(host, strconv.Itoa(int(port)))
	} else if strings.Contains(host, ":") {
		host = "[" + host + "]" // an IPv6 literal
	}
	// A '#' a client left in its query would start a fragment here.
	u := url.URL{Scheme: scheme, Host: host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: strings.ReplaceAll(r.URL.RawQuery, "#", "%23")}
	if rd.Path != nil {
		u.Path, u.RawPath = rd.Path.Apply(r.URL.Path), ""
	}
	if u.Path == "" {
		u.Path = "/"
	}
	return u.String()
}

// hostOnly strips the port (and an IPv6 literal's brackets) from a Host.
func hostOnly(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		return host
	}
	return strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
}

// Mirror is a compiled RequestMirror filter: a copy of Num out of Den
// requests goes to Backend, fire and forget (the sender bounds it; see
// agent/l7/mesh).
type Mirror struct {
	Backend  *Backend
	Num, Den int32
}

// Sample reports whether this request is mirrored; intn returns a uniform
// integer in [0, n).
func (m *Mirror) Sample(intn func(n int) int) bool {
	if m.Num >= m.Den {
		return true
	}
	return m.Num > 0 && int32(intn(int(m.Den))) < m.Num
}

// filterSet receives what the filters of a rule, or of one backendRef,
// do. redirect is nil on a backendRef (a redirect there is refused).
type filterSet struct {
	req, resp *HeaderFilter
	rewrite   **URLRewrite
	redirect  **Redirect
	mirrors   *[]*Mirror
	// prefix is the rule's only match's PathPrefix, for
	// ReplacePrefixMatch; hasPrefix is false when the rule has another
	// kind of match or more than one.
	prefix    string
	hasPrefix bool
}

// rulePrefix returns the PathPrefix a ReplacePrefixMatch replaces: the
// rule must have exactly one match, a PathPrefix (no match at all is the
// default PathPrefix "/"), as the Gateway API's validation requires.
func rulePrefix(ms []gwv1.HTTPRouteMatch) (string, bool) {
	if len(ms) == 0 {
		return "/", true
	}
	if len(ms) != 1 {
		return "", false
	}
	p := ms[0].Path
	if p == nil {
		return "/", true
	}
	if p.Type != nil && *p.Type != gwv1.PathMatchPathPrefix {
		return "", false
	}
	v := "/"
	if p.Value != nil {
		v = *p.Value
	}
	if len(v) > 1 {
		v = strings.TrimSuffix(v, "/")
	}
	return v, true
}

// compileHTTPFilter adds one HTTPRoute filter to fs. An error refuses the
// rule (or the backendRef) it is on; a RequestMirror whose backendRef
// cannot be used is dropped instead and reported, as the Gateway API asks.
func (t *Table) compileHTTPFilter(ref RouteRef, where string, f *gwv1.HTTPRouteFilter, fs filterSet) error {
	switch f.Type {
	case gwv1.HTTPRouteFilterRequestHeaderModifier:
		if f.RequestHeaderModifier == nil {
			return errors.New("type RequestHeaderModifier without requestHeaderModifier")
		}
		return fs.req.merge(f.RequestHeaderModifier)
	case gwv1.HTTPRouteFilterResponseHeaderModifier:
		if f.ResponseHeaderModifier == nil {
			return errors.New("type ResponseHeaderModifier without responseHeaderModifier")
		}
		return fs.resp.merge(f.ResponseHeaderModifier)
	case gwv1.HTTPRouteFilterURLRewrite:
		if f.URLRewrite == nil {
			return errors.New("type URLRewrite without urlRewrite")
		}
		if *fs.rewrite != nil {
			return errors.New("more than one URLRewrite filter")
		}
		if fs.redirect != nil && *fs.redirect != nil {
			return errors.New("URLRewrite and RequestRedirect cannot be used together")
		}
		rw := &URLRewrite{}
		var err error
		if f.URLRewrite.Hostname != nil {
			if rw.Hostname, err = compileHostname(string(*f.URLRewrite.Hostname)); err != nil {
				return fmt.Errorf("urlRewrite.hostname: %w", err)
			}
		}
		if f.URLRewrite.Path != nil {
			if rw.Path, err = compilePathModifier(f.URLRewrite.Path, fs); err != nil {
				return fmt.Errorf("urlRewrite.path: %w", err)
			}
		}
		*fs.rewrite = rw
		return nil
	case gwv1.HTTPRouteFilterRequestRedirect:
		if f.RequestRedirect == nil {
			return errors.New("type RequestRedirect without requestRedirect")
		}
		if fs.redirect == nil {
			return errors.New("RequestRedirect is not supported on a backendRef (put it on the rule, which then has no backendRefs)")
		}
		if *fs.redirect != nil {
			return errors.New("more than one RequestRedirect filter")
		}
		if *fs.rewrite != nil {
			return errors.New("URLRewrite and RequestRedirect cannot be used together")
		}
		rd, err := compileRedirect(f.RequestRedirect, fs)
		if err != nil {
			return fmt.Errorf("requestRedirect: %w", err)
		}
		*fs.redirect = rd
		return nil
	case gwv1.HTTPRouteFilterRequestMirror:
		if f.RequestMirror == nil {
			return errors.New("type RequestMirror without requestMirror")
		}
		m := f.RequestMirror
		mi := &Mirror{Num: 100, Den: 100}
		switch {
		case m.Percent != nil && m.Fraction != nil:
			return errors.New("requestMirror: percent and fraction exclude each other")
		case m.Percent != nil:
			if *m.Percent < 0 || *m.Percent > 100 {
				return fmt.Errorf("requestMirror.percent %d: want 0-100", *m.Percent)
			}
			mi.Num = *m.Percent
		case m.Fraction != nil:
			mi.Num, mi.Den = m.Fraction.Numerator, 100
			if m.Fraction.Denominator != nil {
				mi.Den = *m.Fraction.Denominator
			}
			if mi.Den < 1 || mi.Num < 0 || mi.Num > mi.Den {
				return fmt.Errorf("requestMirror.fraction %d/%d: want 0 <= numerator <= denominator, denominator >= 1", mi.Num, mi.Den)
			}
		}
		be := compileBackendRef(ref, &gwv1.BackendRef{BackendObjectReference: m.BackendRef})
		if be.Invalid != nil {
			t.problem(ref, "%s: requestMirror.backendRef: %v; the mirror is dropped, requests are routed without it", where, be.Invalid)
			return nil
		}
		if len(*fs.mirrors) >= maxMirrors {
			return fmt.Errorf("more than %d RequestMirror filters", maxMirrors)
		}
		mi.Backend = be
		*fs.mirrors = append(*fs.mirrors, mi)
		return nil
	}
	return fmt.Errorf("filter type %q is not supported by nodemesh (supported: RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect, RequestMirror)", f.Type)
}

// maxMirrors bounds the copies one request can make.
const maxMirrors = 4

func compileRedirect(f *gwv1.HTTPRequestRedirectFilter, fs filterSet) (*Redirect, error) {
	rd := &Redirect{Status: http.StatusFound}
	if f.Scheme != nil {
		switch *f.Scheme {
		case "http", "https":
			rd.Scheme = *f.Scheme
		default:
			return nil, fmt.Errorf("scheme %q: want http or https", *f.Scheme)
		}
	}
	if f.Hostname != nil {
		h, err := compileHostname(string(*f.Hostname))
		if err != nil {
			return nil, fmt.Errorf("hostname: %w", err)
		}
		rd.Hostname = h
	}
	if f.Port != nil {
		if *f.Port < 1 || *f.Port > 65535 {
			return nil, fmt.Errorf("port %d: want 1-65535", *f.Port)
		}
		rd.Port = uint16(*f.Port)
	}
	if f.StatusCode != nil {
		switch *f.StatusCode {
		case http.StatusMovedPermanently, http.StatusFound:
			rd.Status = *f.StatusCode
		default:
			return nil, fmt.Errorf("statusCode %d: want 301 or 302", *f.StatusCode)
		}
	}
	if f.Path != nil {
		p, err := compilePathModifier(f.Path, fs)
		if err != nil {
			return nil, fmt.Errorf("path: %w", err)
		}
		rd.Path = p
	}
	return rd, nil
}

func compilePathModifier(p *gwv1.HTTPPathModifier, fs filterSet) (*PathModifier, error) {
	switch p.Type {
	case gwv1.FullPathHTTPPathModifier:
		if p.ReplaceFullPath == nil {
			return nil, errors.New("type ReplaceFullPath without replaceFullPath")
		}
		if p.ReplacePrefixMatch != nil {
			return nil, errors.New("replacePrefixMatch is set on a ReplaceFullPath modifier")
		}
		v := *p.ReplaceFullPath
		if !strings.HasPrefix(v, "/") {
			return nil, fmt.Errorf("replaceFullPath %q: must start with /", v)
		}
		if err := checkPathValue(v); err != nil {
			return nil, fmt.Errorf("replaceFullPath %q: %w", v, err)
		}
		return &PathModifier{Full: v, FullSet: true}, nil
	case gwv1.PrefixMatchHTTPPathModifier:
		if p.ReplacePrefixMatch == nil {
			return nil, errors.New("type ReplacePrefixMatch without replacePrefixMatch")
		}
		if p.ReplaceFullPath != nil {
			return nil, errors.New("replaceFullPath is set on a ReplacePrefixMatch modifier")
		}
		v := *p.ReplacePrefixMatch
		if v != "" && !strings.HasPrefix(v, "/") {
			return nil, fmt.Errorf("replacePrefixMatch %q: must be empty or start with /", v)
		}
		if err := checkPathValue(v); err != nil {
			return nil, fmt.Errorf("replacePrefixMatch %q: %w", v, err)
		}
		if !fs.hasPrefix {
			return nil, errors.New("replacePrefixMatch needs the rule to have exactly one match, of type PathPrefix")
		}
		return &PathModifier{Prefix: fs.prefix, Replace: v}, nil
	}
	return nil, fmt.Errorf("type %q: want ReplaceFullPath or ReplacePrefixMatch", p.Type)
}

// checkPathValue refuses what a rewritten path must not contain: it is
// written as the request's decoded path and must mean one thing to every
// hop (no //, dot segments, escapes, query, fragment or control bytes).
func checkPathValue(v string) error {
	if len(v) > maxPathValue {
		return fmt.Errorf("longer than %d bytes", maxPathValue)
	}
	if strings.Contains(v, "//") || strings.ContainsAny(v, "?#%\\") {
		return errors.New(`must not contain //, ?, #, % or \`)
	}
	for _, seg := range strings.Split(v, "/") {
		if seg == "." || seg == ".." {
			return errors.New("must not contain . or .. segments")
		}
	}
	for i := 0; i < len(v); i++ {
		if v[i] < 0x21 || v[i] == 0x7f {
			return errors.New("must not contain spaces or control characters")
		}
	}
	return nil
}

// compileHostname checks a Gateway API PreciseHostname (a DNS name, no
// wildcard, no port) and returns it lowercased.
func compileHostname(h string) (string, error) {
	h = strings.ToLower(h)
	if errs := validation.IsDNS1123Subdomain(h); len(errs) > 0 {
		return "", fmt.Errorf("%q is not a DNS name: %s", h, strings.Join(errs, "; "))
	}
	return h, nil
}
