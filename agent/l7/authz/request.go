// Package authz is the request side of AuthorizationPolicy: it turns an
// HTTP request into the attributes L7 rules match (method, normalised path,
// host, headers), and matches the L7 fields of a rule (operation methods,
// paths and hosts with their not- forms, and `when` conditions on request
// headers) against them.
//
// The central promise is that a policy and the application can never
// disagree about a request: Prepare normalises the request that will be
// forwarded (the path the application receives is exactly the path that was
// authorised), and rejects what applications interpret in different ways
// (encoded slashes and backslashes, control characters, a header that a
// condition names repeated). Parsing is Go's net/http; nothing here reads
// bytes off a connection.
//
// The rest of AuthorizationPolicy (identities, namespaces, addresses,
// ports, the ALLOW/DENY/AUDIT order) is evaluated by package agent/policy,
// which uses this package for the L7 fields.
package authz

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"path"
	"strings"
)

// ErrBadRequest is wrapped by the errors Prepare returns: the request is
// refused with 400 before any policy is consulted.
var ErrBadRequest = errors.New("request refused before authorization")

// Request is what L7 authorization sees of a request.
type Request struct {
	// Method as sent, case-sensitive.
	Method string
	// Path is the normalised path, without the query.
	Path string
	// Host is the Host (HTTP/2 :authority) lowercased, without a trailing
	// dot; HostPort is the same with the port, if the request named one.
	Host, HostPort string
	// Header is the request's header (not a copy: read-only).
	Header http.Header
}

// Prepare normalises r in place, so that what is forwarded to the
// application is what authorization sees, and returns the attributes to
// authorise. uniqueHeaders are header names (any case) that must appear at
// most once: the ones policy conditions name. An error wraps ErrBadRequest
// and says why; answer 400.
func Prepare(r *http.Request, uniqueHeaders []string) (Request, error) {
	p, err := NormalizePath(r.URL.Path, r.URL.RawPath)
	if err != nil {
		return Request{}, err
	}
	r.URL.Path, r.URL.RawPath = p, ""
	for _, name := range uniqueHeaders {
		if len(r.Header.Values(name)) > 1 {
			return Request{}, fmt.Errorf("%w: header %s appears more than once, and applications disagree on which value counts", ErrBadRequest, http.CanonicalHeaderKey(name))
		}
	}
	host, hostPort := NormalizeHost(r.Host)
	return Request{Method: r.Method, Path: p, Host: host, HostPort: hostPort, Header: r.Header}, nil
}

// NormalizePath returns the path authorization matches and the
// application receives, from a URL's decoded Path and its RawPath (the
// original encoding when it differs from Go's default, as net/url keeps
// it):
//
//   - an encoded slash or backslash (%2F, %5C) is refused: whether it
//     separates segments depends on the application;
//   - a backslash, NUL or other control character is refused;
//   - the path must start with "/" (origin form);
//   - "//" is merged and "." and ".." segments are resolved, never above
//     "/"; a trailing "/" is kept;
//   - ";params" stay part of their segment, as net/http delivers them.
func NormalizePath(decoded, raw string) (string, error) {
	if raw != "" {
		lower := strings.ToLower(raw)
		if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") {
			return "", fmt.Errorf("%w: the path has an encoded / or \\ (%%2F, %%5C), which applications interpret differently", ErrBadRequest)
		}
	}
	if decoded == "" || decoded[0] != '/' {
		return "", fmt.Errorf("%w: the path %q does not start with /", ErrBadRequest, decoded)
	}
	for i := 0; i < len(decoded); i++ {
		c := decoded[i]
		if c == '\\' {
			return "", fmt.Errorf("%w: the path has a backslash, which some applications treat as /", ErrBadRequest)
		}
		if c < 0x20 || c == 0x7f {
			return "", fmt.Errorf("%w: the path has a control character", ErrBadRequest)
		}
	}
	clean := path.Clean(decoded)
	if strings.HasSuffix(decoded, "/") && clean != "/" {
		clean += "/"
	}
	return clean, nil
}

// NormalizeHost lowercases a Host header value and drops a trailing dot;
// it returns the host without the port and, if there was a port, with it.
func NormalizeHost(h string) (host, hostPort string) {
	h = strings.ToLower(h)
	host, port, err := net.SplitHostPort(h)
	if err != nil {
		host, port = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]"), ""
	}
	host = strings.TrimSuffix(host, ".")
	if port == "" {
		return host, host
	}
	return host, net.JoinHostPort(host, port)
}
