package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/agent/rollout"
	"github.com/nodemesh/nodemesh/agent/state"
)

// setupRollout creates the node mark (with a data plane: only an agent that
// terminates tunnels may claim its node) and the peers' view. Without an
// API server (--static-dir) there is neither, and every enrolled pod is
// assumed to have an agent, as before partial rollouts.
func (a *agent) setupRollout() error {
	if a.client == nil {
		return nil
	}
	a.peers = rollout.NewPeers(a.client, rollout.DefaultNamespace)
	a.admin.AddDump("rollout", a.rolloutDump)
	if !a.cfg.Dataplane || a.cfg.perPod() {
		return nil // per-pod agents leave the node mark alone (onlypod.go)
	}
	holder := a.cfg.NodeName
	if h, err := os.Hostname(); err == nil && h != "" {
		holder = h // the pod's name in a DaemonSet
	}
	m, err := rollout.NewMark(rollout.MarkConfig{Client: a.client, Node: a.cfg.NodeName, Holder: holder,
		Duration: a.cfg.MarkDuration, Renew: a.cfg.MarkRenew, Ready: a.terminatesTunnels, Log: a.log.With("component", "rollout")})
	if err != nil {
		return err
	}
	a.mark = m
	return nil
}

// terminatesTunnels is what the node mark claims: the cluster state is
// synced, the data plane is up and the agent is not draining. It is
// coarser than the readiness probe on purpose: a pod still being enrolled
// makes the probe fail, but must not withdraw the mark for the node's other
// pods (a peer's tunnel to a pod not yet captured fails closed).
func (a *agent) terminatesTunnels(context.Context) bool {
	return a.store.Snapshot().Synced() && a.dpUp.Load() && !a.draining.Load()
}

// rolloutDumpT is the "rollout" section of the config dump.
type rolloutDumpT struct {
	Node   string               `json:"node"`
	Synced bool                 `json:"synced"`
	Marks  []rollout.NodeStatus `json:"marks"`
	// Unprotected are enrolled pods whose node has no fresh mark.
	Unprotected []string `json:"unprotectedPods"`
}

func (a *agent) rolloutDump() any {
	d := rolloutDumpT{Node: a.cfg.NodeName, Synced: a.peers.Synced(), Marks: a.peers.Nodes(), Unprotected: []string{}}
	if d.Marks == nil {
		d.Marks = []rollout.NodeStatus{}
	}
	for _, p := range a.store.Snapshot().Pods() {
		if p.Enrolled && !p.HostNetwork && !a.meshCapable(p.Node) {
			d.Unprotected = append(d.Unprotected, p.Namespace+"/"+p.Name+" (node "+p.Node+")")
		}
	}
	return d
}

// meshCapable reports whether node has an agent ready to terminate
// tunnels. This node counts (its pods are served by this agent); before the
// peers' first list, and without an API server, every node counts, so an
// enrolled destination is tried over HBONE and fails closed rather than
// being downgraded.
func (a *agent) meshCapable(node string) bool {
	if a.peers == nil || !a.peers.Synced() || node == a.cfg.NodeName {
		return true
	}
	return a.peers.Capable(node)
}

// meshEndpoint decides how addr (pod p, nil if not a known pod) is
// reached: over HBONE when p is enrolled, serves the port through capture
// and its node is mesh-capable; otherwise in plaintext, unless p is STRICT
// on that port, which is refused (never plaintext to a STRICT pod).
func meshEndpoint(addr netip.AddrPort, p *state.Pod, capable func(node string) bool, strict func(pod string, port uint16) bool) (proxy.Endpoint, error) {
	ep := proxy.Endpoint{Addr: addr}
	if p == nil {
		return ep, nil
	}
	ep.Workload = p.Ref
	// Host-network pods are never in PodByIP; a pod that excluded the
	// port from inbound capture is reached in plaintext.
	if !p.Enrolled || p.Identity.IsZero() || slices.Contains(p.ExcludeInboundPorts, addr.Port()) {
		return ep, nil
	}
	if capable(p.Node) {
		ep.Enrolled = true
		ep.Identity = p.Identity
		return ep, nil
	}
	if strict(p.Ref, addr.Port()) {
		return ep, fmt.Errorf("%s (%s on node %s) has no ready nodemesh agent: %w", p.Ref, addr, p.Node, proxy.ErrStrictMTLS)
	}
	return ep, nil
}
