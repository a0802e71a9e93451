package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Refusal is a decision not to sign, with the code sent to the caller and
// written to the audit log.
type Refusal struct {
	Code identity.Code
	Msg  string
	// Err is an underlying cause for logs (not sent to the caller).
	Err error
	// Limit names the limit (Limit* constants) that caused the refusal, if
	// any. The server counts and logs those instead of auditing each one.
	Limit string
}

func (r *Refusal) Error() string {
	if r.Err != nil {
		return fmt.Sprintf("%s: %s: %v", r.Code, r.Msg, r.Err)
	}
	return fmt.Sprintf("%s: %s", r.Code, r.Msg)
}

func (r *Refusal) Unwrap() error { return r.Err }

func refuse(code identity.Code, format string, args ...any) *Refusal {
	return &Refusal{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// HTTPStatus maps a refusal code to its HTTP status.
func HTTPStatus(code identity.Code) int {
	switch code {
	case identity.CodeUnauthenticated, identity.CodeTokenExpired, identity.CodeTokenAudience, identity.CodeTokenInvalid:
		return http.StatusUnauthorized
	case identity.CodeNotAgent, identity.CodeTokenNotBound, identity.CodeNoWorkload:
		return http.StatusForbidden
	case identity.CodeUnavailable:
		return http.StatusServiceUnavailable
	case identity.CodeInternal:
		return http.StatusInternalServerError
	}
	return http.StatusBadRequest
}

// Request is a parsed, checked sign request.
type Request struct {
	ID       spiffeid.ID
	Workload identity.Workload
	CSR      *x509.CertificateRequest
}

// ParseSignRequest decodes and checks a SignRequest body: a workload SPIFFE
// ID in trust domain td, and a CSR over an ECDSA P-256 key whose signature
// verifies. It never trusts anything else in the CSR.
func ParseSignRequest(body []byte, td spiffeid.TrustDomain) (*Request, *Refusal) {
	if len(body) > identity.MaxRequestBytes {
		return nil, refuse(identity.CodeBadRequest, "request body is %d bytes, more than %d", len(body), identity.MaxRequestBytes)
	}
	var req identity.SignRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return nil, refuse(identity.CodeBadRequest, "request body is not a JSON SignRequest {\"spiffe_id\", \"csr\"}: %v", err)
	}
	if dec.More() {
		return nil, refuse(identity.CodeBadRequest, "request body has data after the JSON object")
	}
	id, w, err := identity.ParseWorkloadID(req.SPIFFEID)
	if err != nil {
		return nil, refuse(identity.CodeBadIdentity, "%v", err)
	}
	if id.TrustDomain() != td {
		return nil, refuse(identity.CodeWrongTrustDomain, "requested %s, but this CA signs only for trust domain %q", id, td)
	}
	if len(req.CSR) == 0 {
		return nil, refuse(identity.CodeBadCSR, "no CSR in request (field csr: base64 DER PKCS#10)")
	}
	csr, err := x509.ParseCertificateRequest(req.CSR)
	if err != nil {
		return nil, refuse(identity.CodeBadCSR, "CSR does not parse as DER PKCS#10: %v", err)
	}
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, refuse(identity.CodeWeakKey, "%v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse(identity.CodeBadCSRSignature, "CSR signature does not verify with its own public key (corrupted, or the key is not the requester's): %v", err)
	}
	return &Request{ID: id, Workload: w, CSR: csr}, nil
}

var errKeyType = errors.New("the CA accepts only ECDSA P-256 keys")

func checkKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return fmt.Errorf("CSR key is ECDSA %s: %w", k.Curve.Params().Name, errKeyType)
		}
		return nil
	case *rsa.PublicKey:
		return fmt.Errorf("CSR key is RSA-%d: %w", k.N.BitLen(), errKeyType)
	case ed25519.PublicKey:
		return fmt.Errorf("CSR key is Ed25519: %w", errKeyType)
	}
	return fmt.Errorf("CSR key is %T: %w", pub, errKeyType)
}
