// Package proxy is the agent's L4 data plane for the workloads on its node:
// what happens to a connection after capture hands it over.
//
//   - Outbound (15001): the original destination is resolved (a Service
//     ClusterIP to one ready endpoint, chosen by power of two choices over
//     in-flight connections), egress policy is checked, and the bytes go
//     through an HBONE tunnel when the endpoint is an enrolled pod, or in
//     plaintext to that endpoint otherwise (for an address outside the
//     cluster, the address the application dialled).
//   - Inbound HBONE (15008): the hbone package authenticates the peer; this
//     package checks the CONNECT target (the pod's own IP, not an agent
//     port), ingress policy, then dials the application and copies.
//   - Inbound plaintext (15006): checks ingress policy, which also owns the
//     workload's mTLS mode (STRICT refuses plaintext except what the
//     policy exempts, such as kubelet probes), and forwards.
//
// Every refusal and setup failure is reported to the Observer with a typed
// RefusalReason; metrics map it to their label values.
//
// Every connection is tracked so that it can be listed, closed when policy
// changes, and drained on shutdown. Plaintext connections are copied with
// splice between the two TCP sockets, one goroutine per direction; HBONE
// tunnels are relayed by the hbone package (hbone.Stream.Relay,
// hbone.Tunnel.Relay) with one goroutine per connection. Half-close is
// preserved both ways on every path (see docs/hbone.md).
//
// The package takes plain values and small interfaces (Resolver, Policy,
// Dialer, OrigDstFunc, the hbone TLS providers), so it runs and benchmarks
// in-process without root; agent/dataplane runs one per enrolled pod
// (agent/resolve is its Resolver, agent/enforce its Policy,
// agent/telemetry its Observer).
package proxy
