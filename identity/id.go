package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is used when no trust domain is configured.
const DefaultTrustDomain = "cluster.local"

// ErrNotWorkloadID reports a SPIFFE ID that is not of the form
// spiffe://<td>/ns/<namespace>/sa/<service-account>.
var ErrNotWorkloadID = errors.New("not a workload SPIFFE ID (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")

// Workload names the Kubernetes service account a workload identity stands for.
type Workload struct {
	Namespace      string
	ServiceAccount string
}

func (w Workload) String() string { return w.Namespace + "/" + w.ServiceAccount }

// WorkloadID returns spiffe://<td>/ns/<ns>/sa/<sa>. It fails when ns or sa
// is not a valid Kubernetes name, so a malformed pod can never mint an ID
// that aliases another one (e.g. an sa containing "/").
func WorkloadID(td spiffeid.TrustDomain, ns, sa string) (spiffeid.ID, error) {
	if td.IsZero() {
		return spiffeid.ID{}, errors.New("building workload SPIFFE ID: empty trust domain")
	}
	if err := validateName("namespace", ns, 63); err != nil {
		return spiffeid.ID{}, fmt.Errorf("building workload SPIFFE ID: %w", err)
	}
	if err := validateName("service account", sa, 253); err != nil {
		return spiffeid.ID{}, fmt.Errorf("building workload SPIFFE ID: %w", err)
	}
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("building workload SPIFFE ID: %w", err)
	}
	return id, nil
}

// ParseWorkloadID parses a workload SPIFFE ID and returns its parts. It
// accepts exactly spiffe://<td>/ns/<ns>/sa/<sa> with valid Kubernetes names.
func ParseWorkloadID(s string) (spiffeid.ID, Workload, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, Workload{}, fmt.Errorf("parsing SPIFFE ID %q: %w", truncate(s), err)
	}
	w, err := WorkloadOf(id)
	if err != nil {
		return spiffeid.ID{}, Workload{}, err
	}
	return id, w, nil
}

// WorkloadOf returns the namespace and service account of a workload ID.
func WorkloadOf(id spiffeid.ID) (Workload, error) {
	parts := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return Workload{}, fmt.Errorf("%q: %w", truncate(id.String()), ErrNotWorkloadID)
	}
	w := Workload{Namespace: parts[1], ServiceAccount: parts[3]}
	if err := validateName("namespace", w.Namespace, 63); err != nil {
		return Workload{}, fmt.Errorf("%q: %w", truncate(id.String()), err)
	}
	if err := validateName("service account", w.ServiceAccount, 253); err != nil {
		return Workload{}, fmt.Errorf("%q: %w", truncate(id.String()), err)
	}
	return w, nil
}

// validateName checks a DNS-1123 subdomain (service accounts) or label
// (namespaces, max 63): lowercase alphanumerics, '-' and '.', starting and
// ending with an alphanumeric.
func validateName(what, s string, max int) error {
	if s == "" {
		return fmt.Errorf("empty %s name", what)
	}
	if len(s) > max {
		return fmt.Errorf("%s name is %d characters, longer than %d", what, len(s), max)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		switch {
		case alnum:
		case (c == '-' || c == '.' && max > 63) && i > 0 && i < len(s)-1:
		default:
			return fmt.Errorf("%s name %q is not a valid Kubernetes name (lowercase letters, digits, '-'%s)", what, truncate(s), map[bool]string{true: ", '.'", false: ""}[max > 63])
		}
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 300 {
		return s[:300] + "..."
	}
	return s
}
