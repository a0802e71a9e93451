// Package ca is nodemesh's certificate authority: it signs X.509 SVIDs for
// node agents, but only for workloads running on the agent's own node.
//
// The pieces follow a request: Server (HTTP, audit log) parses a SignRequest
// (ParseSignRequest), authenticates the caller's service-account token with
// an Authenticator (KubeAuthenticator: TokenReview plus the token's bound
// node or pod), checks with a PodFinder (KubePods) that a running or
// starting pod of the requested service account is scheduled on that node, and asks the
// Authority to sign. The Authority holds the signing key, the trust bundle
// and drives root rotation with an overlap window (Rotate). Keys persist in a
// Kubernetes Secret (SecretStore, or a user-provided cert-manager-shaped
// Secret via LoadProvidedSigner); the bundle is published to a ConfigMap
// (PublishBundle) that agents watch.
package ca
