// Package enforce is the agent's only proxy.Policy: it connects the policy
// engine to the L4 proxy over the snapshot the agent currently enforces.
// Outbound connections get the egress decision (the source agent's share),
// inbound ones (HBONE or plaintext) the ingress decision on the inner
// destination port and the peer's verified SPIFFE ID.
//
// The engine owns the mTLS mode: STRICT, its kubelet-probe exemption and
// AUDIT logging are decided here and nowhere else, so the proxy cannot
// refuse what `nodemeshctl policy explain` allows. A plaintext flow the
// engine refuses at its mTLS step is reported as proxy.RefusedStrictMTLS.
//
// The proxy calls it again for every open connection after a change
// (Reevaluate), which is how a policy, label or namespace change closes
// connections that are now denied.
package enforce

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	corev1 "k8s.io/api/core/v1"

	"github.com/nodemesh/nodemesh/agent/l7/authz"
	"github.com/nodemesh/nodemesh/agent/policy"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/proxy"
)

// Config wires a Policy.
type Config struct {
	// Snapshot returns the snapshot to enforce (nil until the first one
	// exists, which denies everything). Must be safe for concurrent use and
	// must not block.
	Snapshot func() *policy.Snapshot
	// Engine caches decisions; nil means a new Engine of the default size.
	Engine *policy.Engine
	// Log receives AUDIT matches (Info) and denials (Debug). Nil discards.
	Log *slog.Logger
}

// Policy implements proxy.Policy.
type Policy struct {
	cfg Config
}

var _ proxy.Policy = (*Policy)(nil)

// New checks cfg and returns a Policy.
func New(cfg Config) (*Policy, error) {
	if cfg.Snapshot == nil {
		return nil, errors.New("creating the policy enforcer: Config.Snapshot is required")
	}
	if cfg.Engine == nil {
		e, err := policy.NewEngine(0)
		if err != nil {
			return nil, fmt.Errorf("creating the policy enforcer: %w", err)
		}
		cfg.Engine = e
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Policy{cfg: cfg}, nil
}

// Flow maps a proxy flow to the engine's flow and says which direction this
// agent enforces.
func Flow(f *proxy.Flow) (policy.Flow, policy.Direction, error) {
	if f.Workload == nil {
		return policy.Flow{}, "", errors.New("flow without a local workload")
	}
	pf := policy.Flow{Port: f.Dst.Port(), Protocol: corev1.ProtocolTCP}
	switch f.Direction {
	case proxy.Outbound:
		// The source is the local workload (its connection to the outbound
		// listener comes from loopback, so name the pod, not the address);
		// the destination is the endpoint actually reached, found by address.
		pf.SrcPod = f.Workload.String()
		pf.Dst = f.Dst.Addr().Unmap()
		return pf, policy.Egress, nil
	case proxy.Inbound:
		pf.Src = f.Src.Addr().Unmap()
		pf.DstPod = f.Workload.String()
		pf.Dst = f.Dst.Addr().Unmap()
		if f.Transport == proxy.TransportHBONE {
			if f.SrcIdentity.IsZero() {
				return policy.Flow{}, "", errors.New("HBONE flow without a verified source identity")
			}
			pf.Principal = f.SrcIdentity.String()
		}
		pf.L7 = f.L7
		return pf, policy.Ingress, nil
	}
	return policy.Flow{}, "", fmt.Errorf("flow with unknown direction %d", f.Direction)
}

// Check implements proxy.Policy.
func (p *Policy) Check(_ context.Context, f *proxy.Flow) proxy.Decision {
	pf, dir, err := Flow(f)
	if err != nil {
		return proxy.Decision{Reason: "policy: " + err.Error()}
	}
	snap := p.cfg.Snapshot()
	if snap == nil {
		return proxy.Decision{Reason: "policy: no policy snapshot yet (waiting for the API server)"}
	}
	var d *policy.Decision
	if dir == policy.Egress {
		d = p.cfg.Engine.DecideEgress(snap, pf)
	} else {
		d = p.cfg.Engine.DecideIngress(snap, pf)
	}
	for _, a := range d.Audit {
		p.cfg.Log.Info("policy audit", "policy", a.Namespace+"/"+a.Name, "src", f.Src.String(), "dst", f.Dst.String(),
			"spiffe_id", pf.Principal, "verdict", string(d.Verdict))
	}
	if d.Allowed() {
		return proxy.Decision{Allow: true, Reason: Reason(d)}
	}
	p.cfg.Log.Debug("policy denied", "direction", string(d.Direction), "src", f.Src.String(), "dst", f.Dst.String(),
		"pod", f.Workload.String(), "policy", policyName(d.Policy), "rule", d.Rule, "reason", d.Reason)
	return proxy.Decision{Refusal: refusal(d, pf), Reason: Reason(d)}
}

// refusal classifies a denial: plaintext stopped at the mTLS step is
// STRICT; everything else (including a certificate that does not match the
// source pod, also an mTLS step) is policy.
func refusal(d *policy.Decision, pf policy.Flow) proxy.RefusalReason {
	if pf.Principal == "" && len(d.Steps) > 0 {
		if last := d.Steps[len(d.Steps)-1]; last.Verdict == policy.Deny && last.Check == policy.CheckMTLS {
			return proxy.RefusedStrictMTLS
		}
	}
	return proxy.RefusedPolicy
}

// Reason is a one-line summary of a decision for logs: verdict, direction,
// deciding policy and rule, and the engine's reason.
func Reason(d *policy.Decision) string {
	s := string(d.Verdict) + " (" + string(d.Direction)
	if !d.Policy.IsZero() {
		s += ", " + d.Policy.String()
		if d.Rule >= 0 {
			s += fmt.Sprintf(" rule %d", d.Rule)
		}
	}
	return s + "): " + d.Reason
}

func policyName(r policy.PolicyRef) string {
	if r.IsZero() {
		return ""
	}
	return r.Kind + ":" + r.Namespace + "/" + r.Name
}

// Strict reports whether pod ("namespace/name") requires mTLS on port in
// the snapshot being enforced. An unknown pod, or no snapshot yet, is
// STRICT (fail closed). agent/resolve asks it before sending plaintext to
// an enrolled pod whose node has no agent.
func (p *Policy) Strict(pod string, port uint16) bool {
	snap := p.cfg.Snapshot()
	if snap == nil {
		return true
	}
	m, _, ok := snap.MTLSMode(pod, port)
	return !ok || m == v1alpha1.MTLSStrict
}

// CheckRequest decides one HTTP request of an inbound flow handled at L7
// (f.L7, at the destination agent), with the AuthorizationPolicy rules' L7
// fields matched against r. It is the agent/l7 layer's per-request check.
func (p *Policy) CheckRequest(f *proxy.Flow, r *authz.Request) proxy.Decision {
	pf, dir, err := Flow(f)
	if err != nil {
		return proxy.Decision{Reason: "policy: " + err.Error()}
	}
	if dir != policy.Ingress {
		return proxy.Decision{Reason: "policy: requests are authorised at the destination only"}
	}
	snap := p.cfg.Snapshot()
	if snap == nil {
		return proxy.Decision{Reason: "policy: no policy snapshot yet (waiting for the API server)"}
	}
	d := snap.DecideRequest(pf, r)
	for _, a := range d.Audit {
		p.cfg.Log.Info("policy audit", "policy", a.Namespace+"/"+a.Name, "src", f.Src.String(), "dst", f.Dst.String(),
			"spiffe_id", pf.Principal, "method", r.Method, "path", r.Path, "verdict", string(d.Verdict))
	}
	if d.Allowed() {
		return proxy.Decision{Allow: true, Reason: Reason(d)}
	}
	p.cfg.Log.Debug("request denied", "src", f.Src.String(), "dst", f.Dst.String(), "pod", f.Workload.String(),
		"method", r.Method, "path", r.Path, "policy", policyName(d.Policy), "rule", d.Rule, "reason", d.Reason)
	return proxy.Decision{Refusal: proxy.RefusedPolicy, Reason: Reason(d)}
}

// RequestHeaders returns the headers AuthorizationPolicy conditions name in
// the snapshot being enforced (see policy.Snapshot.RequestHeaders).
func (p *Policy) RequestHeaders() []string {
	if snap := p.cfg.Snapshot(); snap != nil {
		return snap.RequestHeaders()
	}
	return nil
}
