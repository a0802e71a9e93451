package policy

import (
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
)

// ValidateNetworkPolicy reports why the engine would refuse np (nil if it accepts it).
func ValidateNetworkPolicy(np *networkingv1.NetworkPolicy) error {
	_, err := compileNetworkPolicy(np)
	return err
}

// ValidateAuthorizationPolicy reports why the engine would refuse ap,
// including L7 fields (wrapping ErrL7Unsupported).
func ValidateAuthorizationPolicy(ap *v1alpha1.AuthorizationPolicy) error {
	_, err := compileAuthorizationPolicy(ap)
	return err
}

// ValidatePeerAuthentication reports why the engine would refuse pa.
func ValidatePeerAuthentication(pa *v1alpha1.PeerAuthentication) error {
	_, err := compilePeerAuthentication(pa)
	return err
}
