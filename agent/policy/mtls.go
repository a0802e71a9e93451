package policy

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// peerAuthn is a compiled PeerAuthentication.
type peerAuthn struct {
	ref      PolicyRef
	created  time.Time
	selector labels.Selector // nil: namespace-wide (mesh-wide in the root namespace)
	mode     v1alpha1.MTLSMode
	ports    map[uint16]v1alpha1.MTLSMode
	refused  error
}

func compilePeerAuthentication(pa *v1alpha1.PeerAuthentication) (*peerAuthn, error) {
	c := &peerAuthn{
		ref:     PolicyRef{Kind: KindPeerAuthentication, Namespace: pa.Namespace, Name: pa.Name},
		created: pa.CreationTimestamp.Time,
	}
	if err := c.compile(pa); err != nil {
		// Fail closed: a refused PeerAuthentication makes the workloads it
		// was meant for STRICT (all ports), never more permissive.
		c.refused = err
		c.mode = v1alpha1.MTLSStrict
		c.ports = nil
		return c, err
	}
	return c, nil
}

func checkMode(m v1alpha1.MTLSMode) (v1alpha1.MTLSMode, error) {
	switch m {
	case "", v1alpha1.MTLSUnset:
		return v1alpha1.MTLSUnset, nil
	case v1alpha1.MTLSStrict, v1alpha1.MTLSPermissive:
		return m, nil
	case v1alpha1.MTLSDisable:
		return "", errors.New("mode DISABLE is not supported: nodemesh always tunnels mesh traffic; use PERMISSIVE to also accept plaintext")
	}
	return "", fmt.Errorf("mode %q: want STRICT, PERMISSIVE or UNSET", m)
}

func (c *peerAuthn) compile(pa *v1alpha1.PeerAuthentication) error {
	if pa.Namespace == "" {
		return errors.New("metadata.namespace is empty")
	}
	if pa.Name == "" {
		return errors.New("metadata.name is empty")
	}
	if pa.Spec.Selector != nil {
		sel, err := compileMatchLabels(pa.Spec.Selector.MatchLabels)
		if err != nil {
			// Keep the stand-in narrow where possible: an unusable selector
			// falls back to namespace-wide (nil), which is STRICT; acceptable
			// because refusing must never weaken security.
			return fmt.Errorf("spec.selector: %w", err)
		}
		c.selector = sel
	}
	c.mode = v1alpha1.MTLSUnset
	if pa.Spec.Mtls != nil {
		m, err := checkMode(pa.Spec.Mtls.Mode)
		if err != nil {
			return fmt.Errorf("spec.mtls.%w", err)
		}
		c.mode = m
	}
	if len(pa.Spec.PortLevelMtls) > 0 {
		if c.selector == nil {
			return errors.New("spec.portLevelMtls needs spec.selector with matchLabels (port numbers are only meaningful for specific workloads)")
		}
		c.ports = make(map[uint16]v1alpha1.MTLSMode, len(pa.Spec.PortLevelMtls))
		for k, v := range pa.Spec.PortLevelMtls {
			p, err := parsePort(k)
			if err != nil {
				return fmt.Errorf("spec.portLevelMtls: key %w", err)
			}
			m, err := checkMode(v.Mode)
			if err != nil {
				return fmt.Errorf("spec.portLevelMtls[%s].%w", k, err)
			}
			c.ports[p] = m
		}
	}
	return nil
}

// mtlsMode resolves the mTLS mode of a pod's port: the narrowest non-UNSET
// setting wins (workload port-level, workload, namespace, root namespace),
// default PERMISSIVE. It returns the deciding policy (zero if default).
func mtlsMode(pod *podEntry, port uint16) (v1alpha1.MTLSMode, *peerAuthn, string) {
	for _, pa := range pod.mtls {
		if pa.ports != nil {
			if m, ok := pa.ports[port]; ok && m != v1alpha1.MTLSUnset {
				return m, pa, "port-level setting for port " + strconv.Itoa(int(port)) + " of"
			}
		}
		if pa.mode != v1alpha1.MTLSUnset {
			scope := "namespace-wide"
			switch {
			case pa.selector != nil:
				scope = "workload"
			case pa.ref.Namespace != pod.Namespace:
				scope = "mesh-wide"
			}
			if pa.refused != nil {
				scope += " (refused, treated as STRICT: " + pa.refused.Error() + ")"
			}
			return pa.mode, pa, scope
		}
	}
	return v1alpha1.MTLSPermissive, nil, "default"
}
