package policy

import (
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/nodemesh/nodemesh/agent/l7/authz"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// Flow is one connection as the engine sees it.
//
// Port is always the inner destination port (the port the application
// dialled, after Service resolution): never the HBONE tunnel port. Dst is the
// real destination (an endpoint, not a ClusterIP).
type Flow struct {
	Src netip.Addr
	Dst netip.Addr
	// SrcPod and DstPod ("namespace/name") name the pods when the caller knows
	// them (the source agent knows its pod); otherwise pods are found by IP.
	SrcPod   string
	DstPod   string
	Port     uint16
	Protocol corev1.Protocol
	// Principal is the source's SPIFFE ID, set only when the connection
	// arrived over authenticated HBONE (mTLS); "" means plaintext.
	Principal string
	// L7 is true when the destination agent handles the connection's
	// requests at L7 and authorises each (DecideRequest): AuthorizationPolicy
	// rules with L7 fields are then decided per request. False: such rules
	// cannot be decided and fail closed (see docs/l7.md).
	L7 bool
}

// Verdict is ALLOW or DENY.
type Verdict string

// Verdicts.
const (
	Allow Verdict = "ALLOW"
	Deny  Verdict = "DENY"
)

// Direction is where a check is evaluated.
type Direction string

// Directions. Both is used in a Decision that allowed a connection after
// evaluating egress and ingress.
const (
	Egress  Direction = "egress"
	Ingress Direction = "ingress"
	Both    Direction = "both"
)

// Checks a Step can be.
const (
	CheckFlow                = "flow"
	CheckNetworkPolicy       = "NetworkPolicy"
	CheckMTLS                = "mTLS"
	CheckAuthorizationPolicy = "AuthorizationPolicy"
)

// Step is one check of a decision, in evaluation order.
type Step struct {
	Direction Direction `json:"direction"`
	Check     string    `json:"check"`
	Verdict   Verdict   `json:"verdict"`
	Policy    PolicyRef `json:"policy,omitzero"`
	// Rule is the index of the deciding rule in the policy (ingress or egress
	// rules for a NetworkPolicy, spec.rules for an AuthorizationPolicy); -1 if none.
	Rule   int    `json:"rule"`
	Reason string `json:"reason"`
}

// Decision is the result of evaluating a Flow. Decisions returned by an
// Engine are shared between callers and must not be modified.
type Decision struct {
	Verdict Verdict `json:"verdict"`
	// Direction that decided: the denying direction, or Both (Ingress or
	// Egress when only one was evaluated) for ALLOW.
	Direction Direction `json:"direction"`
	// Policy and Rule that decided (for ALLOW: the most specific allowing
	// policy, preferring the destination side); zero Policy and Rule -1 when
	// the default decided.
	Policy PolicyRef `json:"policy,omitzero"`
	Rule   int       `json:"rule"`
	Reason string    `json:"reason"`
	// Audit lists the AUDIT AuthorizationPolicies that matched.
	Audit []PolicyRef `json:"audit,omitempty"`
	Steps []Step      `json:"steps"`
	// Src and Dst describe the resolved endpoints ("ns/pod (ip)" or "ip").
	Src string `json:"src"`
	Dst string `json:"dst"`
	// Port and Protocol echo the flow.
	Port     uint16          `json:"port"`
	Protocol corev1.Protocol `json:"protocol"`
	// Principal echoes the flow's source identity ("" for plaintext).
	Principal string `json:"principal,omitempty"`
	// Request describes the HTTP request decided, when one was (explain
	// with a method, path or host); nil for a connection.
	Request *RequestInfo `json:"request,omitempty"`
	// SnapshotVersion is the version of the snapshot that evaluated the flow
	// (an Engine returns a cached decision in later snapshots where nothing
	// it read has changed).
	SnapshotVersion uint64 `json:"snapshotVersion"`
}

// RequestInfo is the HTTP request of a decision, as authorization saw it.
type RequestInfo struct {
	Method string `json:"method"`
	// Path is the path as given; Normalized the path rules matched and the
	// application would receive (empty when the request was refused before
	// authorization).
	Path       string `json:"path"`
	Normalized string `json:"normalized,omitempty"`
	Host       string `json:"host,omitempty"`
	// L7 is true when the destination port is handled at L7 (a Service
	// that opted in targets it), so the request is authorised on its own.
	// False: the request's fields cannot be checked, and rules with L7
	// fields fail closed for the whole connection.
	L7 bool `json:"l7"`
	// Status is what the destination agent answers instead of forwarding:
	// 403 (denied by policy) or 400 (refused before authorization); 0 when
	// the request is forwarded, or when the connection itself is refused.
	Status int    `json:"status,omitempty"`
	Note   string `json:"note,omitempty"`
}

// Allowed reports whether the verdict is ALLOW.
func (d *Decision) Allowed() bool { return d.Verdict == Allow }

type dirMask uint8

const (
	evalEgress dirMask = 1 << iota
	evalIngress
	evalBoth = evalEgress | evalIngress
)

// Decide evaluates both directions: egress at the source and ingress at the
// destination. The connection is allowed only if both allow it.
func (s *Snapshot) Decide(f Flow) *Decision { return s.decide(f, evalBoth) }

// DecideEgress evaluates only what the source's agent enforces.
func (s *Snapshot) DecideEgress(f Flow) *Decision { return s.decide(f, evalEgress) }

// DecideIngress evaluates only what the destination's agent enforces.
func (s *Snapshot) DecideIngress(f Flow) *Decision { return s.decide(f, evalIngress) }

func (s *Snapshot) resolve(key string, ip netip.Addr) (endpoint, error) {
	ip = ip.Unmap()
	if key != "" {
		p, ok := s.pods.Get(key)
		if !ok {
			return endpoint{}, fmt.Errorf("pod %s is not in the snapshot", key)
		}
		if p.HostNetwork {
			// A host-network pod is its node's address, not a pod peer.
			if !ip.IsValid() && len(p.IPs) > 0 {
				ip = p.IPs[0].Unmap()
			}
			return endpoint{ip: ip}, nil
		}
		if !ip.IsValid() {
			if len(p.IPs) == 0 {
				return endpoint{}, fmt.Errorf("pod %s has no IP address", key)
			}
			ip = p.IPs[0].Unmap()
		} else if !slices.ContainsFunc(p.IPs, func(a netip.Addr) bool { return a.Unmap() == ip }) {
			return endpoint{}, fmt.Errorf("address %s does not belong to pod %s", ip, key)
		}
		return endpoint{ip: ip, pod: p}, nil
	}
	if !ip.IsValid() {
		return endpoint{}, fmt.Errorf("neither a pod nor an address given")
	}
	return endpoint{ip: ip, pod: s.podsByIP.Lookup(ip)}, nil
}

func describe(e endpoint) string {
	if e.pod != nil {
		return e.pod.Key() + " (" + e.ip.String() + ")"
	}
	return e.ip.String()
}

// DecideRequest decides one HTTP request of an ingress flow handled at L7
// (f.L7): the ingress checks again, with every AuthorizationPolicy rule's
// L7 fields matched against r (prepared by authz.Prepare). It is not
// cached: requests differ.
func (s *Snapshot) DecideRequest(f Flow, r *authz.Request) *Decision {
	f.L7 = true
	return s.decideRequest(f, evalIngress, r)
}

// DecideRequestBoth is DecideRequest preceded by the source's egress
// checks, which see only the connection: what a request meets on its way
// from one pod to another (policy explain).
func (s *Snapshot) DecideRequestBoth(f Flow, r *authz.Request) *Decision {
	f.L7 = true
	return s.decideRequest(f, evalBoth, r)
}

func (s *Snapshot) decide(f Flow, dirs dirMask) *Decision { return s.decideRequest(f, dirs, nil) }

func (s *Snapshot) decideRequest(f Flow, dirs dirMask, req *authz.Request) *Decision {
	d := &Decision{
		Rule: -1, Port: f.Port, Protocol: f.Protocol, Principal: f.Principal,
		SnapshotVersion: s.version,
	}
	fail := func(reason string) *Decision {
		d.Verdict, d.Reason = Deny, reason
		d.Direction = Ingress
		if dirs == evalEgress {
			d.Direction = Egress
		}
		d.Steps = append(d.Steps, Step{Direction: d.Direction, Check: CheckFlow, Verdict: Deny, Rule: -1, Reason: reason})
		return d
	}
	src, err := s.resolve(f.SrcPod, f.Src)
	if err != nil {
		return fail("invalid flow: source: " + err.Error())
	}
	dst, err := s.resolve(f.DstPod, f.Dst)
	if err != nil {
		return fail("invalid flow: destination: " + err.Error())
	}
	d.Src, d.Dst = describe(src), describe(dst)
	if f.Port == 0 {
		return fail("invalid flow: port 0")
	}
	if err := checkProtocol(f.Protocol); err != nil {
		return fail("invalid flow: " + err.Error())
	}

	var egress, ingress *Step
	if dirs&evalEgress != 0 {
		st := s.evalEgress(src, dst, &f)
		d.Steps = append(d.Steps, st)
		egress = &d.Steps[len(d.Steps)-1]
		if st.Verdict == Deny {
			d.Verdict, d.Direction, d.Policy, d.Rule, d.Reason = Deny, Egress, st.Policy, st.Rule, st.Reason
			return d
		}
	}
	if dirs&evalIngress != 0 {
		steps, audit := s.evalIngress(src, dst, &f, req)
		d.Audit = audit
		d.Steps = append(d.Steps, steps...)
		last := steps[len(steps)-1]
		if last.Verdict == Deny {
			d.Verdict, d.Direction, d.Policy, d.Rule, d.Reason = Deny, Ingress, last.Policy, last.Rule, last.Reason
			return d
		}
		// The most specific allowing ingress step: the last one with a policy.
		for i := len(d.Steps) - 1; i >= 0; i-- {
			if d.Steps[i].Direction == Ingress && !d.Steps[i].Policy.IsZero() {
				ingress = &d.Steps[i]
				break
			}
		}
	}
	d.Verdict = Allow
	switch dirs {
	case evalBoth:
		d.Direction = Both
	case evalEgress:
		d.Direction = Egress
	default:
		d.Direction = Ingress
	}
	switch {
	case ingress != nil:
		d.Policy, d.Rule, d.Reason = ingress.Policy, ingress.Rule, ingress.Reason
	case egress != nil && !egress.Policy.IsZero():
		d.Policy, d.Rule, d.Reason = egress.Policy, egress.Rule, egress.Reason
	default:
		d.Reason = "no policy restricts this connection"
	}
	return d
}

func (s *Snapshot) evalEgress(src, dst endpoint, f *Flow) Step {
	if src.pod == nil {
		return Step{Direction: Egress, Check: CheckNetworkPolicy, Verdict: Allow, Rule: -1,
			Reason: "source " + src.ip.String() + " is not a pod in the cluster; no egress policy applies"}
	}
	return s.evalNetPol(Egress, src.pod, dst, dst.pod, f)
}

// isNodeSource reports whether a plaintext source is the destination pod's own
// node (kubelet and other host processes).
func (s *Snapshot) isNodeSource(src endpoint, dst *podEntry, f *Flow) bool {
	if f.Principal != "" || src.pod != nil || dst.Node == "" {
		return false
	}
	for _, ip := range s.nodeIPs.Lookup(dst.Node) {
		if ip.Unmap() == src.ip {
			return true
		}
	}
	return false
}

func (s *Snapshot) evalIngress(src, dst endpoint, f *Flow, req *authz.Request) ([]Step, []PolicyRef) {
	var steps []Step
	if dst.pod == nil {
		return []Step{{Direction: Ingress, Check: CheckNetworkPolicy, Verdict: Allow, Rule: -1,
			Reason: "destination " + dst.ip.String() + " is not a pod in the cluster; no ingress policy applies"}}, nil
	}
	pod := dst.pod
	fromNode := s.isNodeSource(src, pod, f)
	probe := fromNode && f.Protocol == corev1.ProtocolTCP && slices.Contains(pod.ProbePorts, int32(f.Port))

	// Authenticated source: the certificate must belong to the pod at the source address.
	if f.Principal != "" && src.pod != nil && f.Principal != src.pod.spiffeID {
		return []Step{{Direction: Ingress, Check: CheckMTLS, Verdict: Deny, Rule: -1,
			Reason: fmt.Sprintf("source identity %s does not match pod %s at %s (expected %s)", f.Principal, src.pod.Key(), src.ip, src.pod.spiffeID)}}, nil
	}

	// mTLS mode (TCP only: the mesh carries TCP; only meshed pods have it).
	if f.Protocol == corev1.ProtocolTCP && !pod.Unmeshed {
		mode, pa, scope := mtlsMode(pod, f.Port)
		st := Step{Direction: Ingress, Check: CheckMTLS, Verdict: Allow, Rule: -1}
		if pa != nil {
			st.Policy = pa.ref
		}
		switch {
		case f.Principal != "":
			st.Reason = fmt.Sprintf("authenticated as %s (mode %s, %s)", f.Principal, mode, scope)
		case mode == v1alpha1.MTLSStrict && probe:
			st.Reason = fmt.Sprintf("plaintext kubelet probe from node %s to probe port %d is accepted although mode is STRICT (%s)", pod.Node, f.Port, scope)
		case mode == v1alpha1.MTLSStrict:
			st.Verdict = Deny
			st.Reason = fmt.Sprintf("plaintext connection refused: mTLS mode is STRICT (%s) for %s port %d", scope, pod.Key(), f.Port)
		default:
			st.Reason = fmt.Sprintf("plaintext accepted: mTLS mode is %s (%s)", mode, scope)
		}
		if pa != nil {
			st.Reason += "; set by " + pa.ref.String()
		}
		steps = append(steps, st)
		if st.Verdict == Deny {
			return steps, nil
		}
	}

	// NetworkPolicy.
	if fromNode {
		steps = append(steps, Step{Direction: Ingress, Check: CheckNetworkPolicy, Verdict: Allow, Rule: -1,
			Reason: fmt.Sprintf("traffic from the pod's own node %s (%s) is always allowed by NetworkPolicy", pod.Node, src.ip)})
	} else {
		st := s.evalNetPol(Ingress, pod, src, pod, f)
		steps = append(steps, st)
		if st.Verdict == Deny {
			return steps, nil
		}
	}

	// AuthorizationPolicy (TCP only, meshed destinations only).
	if f.Protocol != corev1.ProtocolTCP {
		return steps, nil
	}
	if pod.Unmeshed {
		if len(pod.allowAZ)+len(pod.denyAZ)+len(pod.auditAZ) > 0 {
			steps = append(steps, Step{Direction: Ingress, Check: CheckAuthorizationPolicy, Verdict: Allow, Rule: -1,
				Reason: pod.Key() + " is not in the mesh: AuthorizationPolicies selecting it are not enforced"})
		}
		return steps, nil
	}
	id := identityOf(f.Principal, src.ip)
	auditL7 := newL7Eval(v1alpha1.ActionAudit, f.L7, req)
	denyL7 := newL7Eval(v1alpha1.ActionDeny, f.L7, req)
	allowL7 := newL7Eval(v1alpha1.ActionAllow, f.L7, req)
	var audit []PolicyRef
	for _, az := range pod.auditAZ {
		for i := range az.rules {
			if az.rules[i].matches(&id, f.Port, false, auditL7) {
				audit = append(audit, az.ref)
				break
			}
		}
	}
	for _, az := range pod.denyAZ {
		for i := range az.rules {
			if az.rules[i].matches(&id, f.Port, true, denyL7) {
				reason := fmt.Sprintf("DENY rule %d of %s matches", i, az.ref)
				if az.refused != nil {
					reason = fmt.Sprintf("%s was refused (%v) and denies every connection to the workloads it selects", az.ref, az.refused)
					i = -1
				}
				steps = append(steps, Step{Direction: Ingress, Check: CheckAuthorizationPolicy, Verdict: Deny, Policy: az.ref, Rule: i, Reason: reason})
				return steps, audit
			}
		}
	}
	if len(pod.allowAZ) == 0 {
		if len(pod.denyAZ) > 0 {
			steps = append(steps, Step{Direction: Ingress, Check: CheckAuthorizationPolicy, Verdict: Allow, Rule: -1,
				Reason: "no DENY AuthorizationPolicy matches and no ALLOW policy selects " + pod.Key()})
		}
		return steps, audit
	}
	if probe {
		steps = append(steps, Step{Direction: Ingress, Check: CheckAuthorizationPolicy, Verdict: Allow, Rule: -1,
			Reason: fmt.Sprintf("kubelet probe from node %s to probe port %d is exempt from ALLOW AuthorizationPolicies", pod.Node, f.Port)})
		return steps, audit
	}
	for _, az := range pod.allowAZ {
		for i := range az.rules {
			if az.rules[i].matches(&id, f.Port, false, allowL7) {
				steps = append(steps, Step{Direction: Ingress, Check: CheckAuthorizationPolicy, Verdict: Allow, Policy: az.ref, Rule: i,
					Reason: fmt.Sprintf("ALLOW rule %d of %s matches", i, az.ref)})
				return steps, audit
			}
		}
	}
	names := ""
	for i, az := range pod.allowAZ {
		if i > 0 {
			names += ", "
		}
		names += az.ref.Namespace + "/" + az.ref.Name
		if az.refused != nil {
			names += " (refused: " + az.refused.Error() + ")"
		}
	}
	who := "plaintext source " + src.ip.String()
	if f.Principal != "" {
		who = f.Principal
	}
	steps = append(steps, Step{Direction: Ingress, Check: CheckAuthorizationPolicy, Verdict: Deny, Policy: pod.allowAZ[0].ref, Rule: -1,
		Reason: fmt.Sprintf("ALLOW AuthorizationPolicies select %s (%s) but none matches %s to port %d", pod.Key(), names, who, f.Port)})
	return steps, audit
}
