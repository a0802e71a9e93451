// Package workloads decides which pods of this node the agent serves and
// what has to change when the cluster state does. Plan is pure: from the
// pods wanted now and what the data plane serves, it returns the enroll,
// unenroll, retry, recheck and update actions, in a fixed order. Locator
// finds where a pod lives (its network namespace and cgroup), from the
// lab's annotations or from /proc on a real node.
package workloads

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/nodemesh/nodemesh/agent/state"
)

// Filter selects the pods the agent serves.
type Filter struct {
	// Node is this node's name.
	Node string
	// Only, when not empty, restricts the agent to these pods
	// ("namespace/name"): per-pod (sidecar) mode. It narrows, never widens.
	Only map[string]bool
}

// Wanted reports whether the agent should capture p, a pod of its node
// that Locator has located.
func (f Filter) Wanted(p *state.Pod) bool {
	return p.Enrolled && p.Live() && len(p.IPs) > 0 && p.Netns() != "" && !p.Identity.IsZero() && f.serves(p)
}

func (f Filter) serves(p *state.Pod) bool {
	if len(f.Only) == 0 {
		return true
	}
	return f.Only[p.Namespace+"/"+p.Name]
}

// WantedIPs returns the addresses of the wanted pods (a pod left captured
// by a previous agent with one of them must stay captured until it is
// enrolled again).
func WantedIPs(want []*state.Pod) map[netip.Addr]bool {
	out := make(map[netip.Addr]bool)
	for _, p := range want {
		for _, ip := range p.IPs {
			out[ip.Unmap()] = true
		}
	}
	return out
}

// Served is what the data plane has for one pod.
type Served struct {
	// Pod is the pod as enrolled.
	Pod *state.Pod
	// Excluded and ExcludedIn are the outbound and inbound ports capture
	// currently leaves alone.
	Excluded, ExcludedIn []uint16
	// Captured: capture enrollment succeeded (a failed enrollment leaves
	// nothing to keep).
	Captured bool
	// Failed: enrollment or the capture self-check failed.
	Failed bool
}

// Kind is what an Action does.
type Kind uint8

// Kinds of actions, in the order Plan returns them.
const (
	// Unenroll: the pod left the node or the mesh, or its sandbox or
	// addresses changed (an Enroll follows then).
	Unenroll Kind = iota + 1
	// Enroll a pod not served yet.
	Enroll
	// Retry: enrollment failed and left nothing captured; discard it and
	// enroll again.
	Retry
	// Recheck: captured, but the self-check failed; check again. The pod
	// stays captured meanwhile (never a window of plain networking).
	Recheck
	// UpdateExcluded: the pod's excluded outbound or inbound ports
	// changed; capture updates them in place, without uncapturing the pod.
	UpdateExcluded
)

func (k Kind) String() string {
	switch k {
	case Unenroll:
		return "unenroll"
	case Enroll:
		return "enroll"
	case Retry:
		return "retry"
	case Recheck:
		return "recheck"
	case UpdateExcluded:
		return "update-excluded"
	}
	return "unknown"
}

// Action is one change for one pod.
type Action struct {
	Kind Kind
	Key  state.Key
	// Pod is the wanted pod (nil for Unenroll).
	Pod *state.Pod
}

// Plan returns the actions that take served to want (the wanted, located
// pods): unenrolls first, then the rest, each group in key order.
func Plan(served map[state.Key]Served, want []*state.Pod) []Action {
	wanted := make(map[state.Key]*state.Pod, len(want))
	for _, p := range want {
		wanted[p.Key()] = p
	}
	var out []Action
	gone := make(map[state.Key]bool)
	for k, s := range served {
		p, ok := wanted[k]
		if !ok || p.UID() != s.Pod.UID() || p.Netns() != s.Pod.Netns() || !slices.Equal(p.IPs, s.Pod.IPs) {
			out = append(out, Action{Kind: Unenroll, Key: k})
			gone[k] = true
		}
	}
	for k, p := range wanted {
		s, ok := served[k]
		switch {
		case !ok || gone[k]:
			out = append(out, Action{Kind: Enroll, Key: k, Pod: p})
		case s.Failed && !s.Captured:
			out = append(out, Action{Kind: Retry, Key: k, Pod: p})
		case s.Failed:
			out = append(out, Action{Kind: Recheck, Key: k, Pod: p})
		case !slices.Equal(s.Excluded, p.ExcludeOutboundPorts()) || !slices.Equal(s.ExcludedIn, p.ExcludeInboundPorts()):
			out = append(out, Action{Kind: UpdateExcluded, Key: k, Pod: p})
		}
	}
	slices.SortFunc(out, func(a, b Action) int {
		return cmp.Or(cmp.Compare(order(a.Kind), order(b.Kind)), cmp.Compare(a.Key.String(), b.Key.String()))
	})
	return out
}

// order puts unenrolls first; the other kinds keep key order among
// themselves.
func order(k Kind) int {
	if k == Unenroll {
		return 0
	}
	return 1
}
