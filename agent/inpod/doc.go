// Package inpod opens the agent's sockets inside a pod's network namespace.
//
// The node agent serves each enrolled pod from sockets that live in the
// pod's network namespace but belong to the agent process, as Istio's in-pod
// ztunnel does: 127.0.0.1:15001 (and [::1]:15001) for captured outbound
// connections, 127.0.0.1:15006 (and [::1]:15006) for inbound plaintext that
// the sk_lookup program steers there, and podIP:15008 for HBONE. A socket's
// network namespace is fixed when it is created, so Do enters the namespace
// with setns(2) on a locked OS thread only for the socket(2) call (and the
// connect or bind that follows), then restores the thread.
//
// Listeners are plain TCP, never MPTCP: Go makes listeners MPTCP by default
// and an MPTCP socket cannot be put into a sockmap. Sockets the agent dials
// carry SO_MARK so that the capture programs leave them alone.
package inpod
