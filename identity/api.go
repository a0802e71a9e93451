package identity

import (
	"errors"
	"fmt"
	"time"
)

// Wire constants of the CA API.
const (
	// DefaultPort is the CA's HTTPS port (istiod's CA port, so operators
	// recognise it).
	DefaultPort = 15012
	// Audience is the audience agents request for their CA tokens; the CA
	// refuses tokens minted for any other audience.
	Audience = "nodemesh-ca"
	// SignPath, BundlePath and HealthPath are the CA's HTTP routes.
	SignPath   = "/v1/sign"
	BundlePath = "/v1/bundle"
	HealthPath = "/healthz"
	// VersionPath answers {"version": "<build version>"}.
	VersionPath = "/version"
	// BundleConfigMap is the ConfigMap (in the CA's namespace) the CA
	// publishes the trust bundle in, under BundleKey as PEM certificates.
	BundleConfigMap = "nodemesh-trust-bundle"
	BundleKey       = "ca.crt"
	// MaxRequestBytes bounds a sign request body.
	MaxRequestBytes = 64 << 10
)

// SignRequest asks the CA for an X.509 SVID. The CA ignores every SAN and
// subject in the CSR: the certificate it signs carries exactly SPIFFEID.
type SignRequest struct {
	// SPIFFEID is the workload identity wanted,
	// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
	SPIFFEID string `json:"spiffe_id"`
	// CSR is a DER PKCS#10 request over an ECDSA P-256 key.
	CSR []byte `json:"csr"`
}

// SignResponse carries the signed SVID and the trust bundle.
type SignResponse struct {
	// Chain is the SVID certificate followed by any intermediates, DER.
	Chain [][]byte `json:"chain"`
	// Bundle holds the trust domain's root certificates, DER. During a
	// root rotation it holds both the old and the new root.
	Bundle [][]byte `json:"bundle"`
	// ExpiresAt repeats the SVID's NotAfter for logs.
	ExpiresAt time.Time `json:"expires_at"`
}

// Code classifies a CA refusal so that callers (and operators reading audit
// logs) can act on it.
type Code string

// Refusal codes. Each has one cause; the message adds the details.
const (
	CodeBadRequest       Code = "bad_request"           // body is not a valid SignRequest
	CodeUnauthenticated  Code = "unauthenticated"       // no bearer token
	CodeTokenExpired     Code = "token_expired"         // token past its exp
	CodeTokenAudience    Code = "token_wrong_audience"  // token not minted for audience nodemesh-ca
	CodeTokenInvalid     Code = "token_invalid"         // TokenReview rejected it (forged, revoked, bound object gone)
	CodeNotAgent         Code = "caller_not_agent"      // token of another service account
	CodeTokenNotBound    Code = "token_not_node_bound"  // token carries no node and no pod to find one
	CodeNoWorkload       Code = "no_workload_on_node"   // no running or starting pod with ns/sa on the caller's node
	CodeBadIdentity      Code = "bad_identity"          // requested ID is not a workload ID
	CodeWrongTrustDomain Code = "wrong_trust_domain"    // requested ID is in another trust domain
	CodeBadCSR           Code = "bad_csr"               // CSR does not parse
	CodeBadCSRSignature  Code = "csr_signature_invalid" // CSR self-signature does not verify
	CodeWeakKey          Code = "weak_key"              // CSR key is not ECDSA P-256
	CodeUnavailable      Code = "unavailable"           // the CA cannot decide now (API server down); retry
	CodeInternal         Code = "internal"              // a CA bug or signing failure
)

// ErrorResponse is the body of every non-2xx CA response.
type ErrorResponse struct {
	Code    Code   `json:"code"`
	Message string `json:"error"`
}

// RefusedError is what a CA client returns for an ErrorResponse.
type RefusedError struct {
	Code       Code
	Message    string
	HTTPStatus int
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("CA refused (%s, HTTP %d): %s", e.Code, e.HTTPStatus, e.Message)
}

// Retryable reports whether retrying the same request later can succeed
// without anyone changing anything (a pod may yet be scheduled, the API
// server may come back).
func (e *RefusedError) Retryable() bool {
	switch e.Code {
	case CodeUnavailable, CodeInternal, CodeNoWorkload, CodeTokenExpired, CodeTokenInvalid:
		// Token problems heal when the kubelet refreshes the projected token.
		return true
	}
	return false
}

// RefusalCode returns the Code of a *RefusedError in err's chain, or "".
func RefusalCode(err error) Code {
	var re *RefusedError
	if errors.As(err, &re) {
		return re.Code
	}
	return ""
}
