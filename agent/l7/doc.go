// Package l7 is nodemesh's optional HTTP handling: what the node agent does
// with connections to Services that opted in (label nodemesh.io/l7=enabled
// on the Service or its namespace; see docs/l7.md).
//
// This package holds the decisions that come before any HTTP is parsed:
// whether a Service port is opted in, which protocol it declares
// (appProtocol), and, for ports that declare nothing, whether the first
// bytes a client sent look like HTTP/1.x or HTTP/2 with prior knowledge.
// Everything not positively recognised stays on the L4 path.
//
// The sub-packages do the per-request work, as pure logic over net/http
// values, testable without root:
//
//   - route: Gateway API HTTPRoute and GRPCRoute (the GAMMA mesh profile:
//     parentRef is a Service) compiled into a per-Service table; matching,
//     weighted backends, header modifiers, URL rewrites, redirects,
//     mirrors, timeouts and retry policy.
//   - retry: the retry budget that keeps retries from multiplying load.
//   - tracing: W3C trace context and OTLP span export for the request path.
//   - mesh: the agent's request path itself (proxy.L7), using all of the above.
//   - authz: request normalisation and the L7 fields of AuthorizationPolicy.
//   - resilience: fault injection and local rate limiting from the
//     TrafficPolicy CRD (types in v1alpha1).
package l7
