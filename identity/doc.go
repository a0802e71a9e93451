// Package identity holds what the nodemesh CA and the node agents share: the
// shape of workload SPIFFE IDs, the CA's HTTPS API (request, response and
// refusal codes), and the provider interface the data path reads SVIDs from.
//
// Workload identity is spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
// The CA (package identity/ca, binary cmd/nodemesh-ca) listens on HTTPS port
// 15012 (DefaultPort) and serves:
//
//	POST /v1/sign    Authorization: Bearer <service-account token, audience nodemesh-ca>
//	                 body SignRequest (JSON)  -> SignResponse (JSON), or ErrorResponse
//	GET  /v1/bundle  the trust bundle, PEM (no authentication; it is public)
//	GET  /healthz    liveness
//
// The agent side lives in identity/svid (the SVID manager and CA client),
// identity/k8s (informer-driven adapters) and identity/workload (a SPIFFE
// Workload API endpoint as an alternative to the built-in CA).
package identity
