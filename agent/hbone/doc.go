// Package hbone implements HBONE, Istio's tunnel protocol, for the nodemesh
// agent: TCP streams carried as HTTP/2 CONNECT requests over mutual TLS 1.3
// (ALPN "h2") to port 15008 of the destination pod, authenticated on both ends
// with SPIFFE X.509 SVIDs.
//
// The client side is a [Pool] of HTTP/2 connections keyed by (source
// identity, destination identity, destination address); the server side is a
// [Server] that authenticates the peer, validates each CONNECT and hands the
// stream to a [Handler]. Both run on this package's own HTTP/2 connection
// engine (conn.go, read.go, recv.go, write.go, stream.go, relay.go), built on the frame and
// HPACK codecs of golang.org/x/net/http2 and tuned for tunnels: few
// goroutine hand-offs, coalesced TLS writes, DATA delivered straight to the
// application socket. Decisions about what
// a tunnel may reach (target IP, agent ports, policy) belong to the handler,
// which the proxy package provides.
//
// Wire behaviour and the differences from ztunnel are described in
// docs/hbone.md.
package hbone
