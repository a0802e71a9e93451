package l7

import "strings"

// LabelL7 on a Service or a namespace opts its Services in to (ValueEnabled)
// or out of (ValueDisabled) L7 handling. A Service's own label wins.
const (
	LabelL7       = "nodemesh.io/l7"
	ValueEnabled  = "enabled"
	ValueDisabled = "disabled"
)

// OptedIn reports whether a Service with svcLabels in a namespace with
// nsLabels is handled at L7. Any value other than "enabled" or "disabled"
// counts as absent on the Service and as not enabled on the namespace, so a
// typo never turns parsing on.
func OptedIn(nsLabels, svcLabels map[string]string) bool {
	switch svcLabels[LabelL7] {
	case ValueEnabled:
		return true
	case ValueDisabled:
		return false
	}
	return nsLabels[LabelL7] == ValueEnabled
}

// Protocol is how an opted-in connection is handled.
type Protocol uint8

// Protocols. Undeclared means the port declares nothing and the first bytes
// decide; TCP means L4 only, never parsed.
const (
	Undeclared Protocol = iota
	HTTP1
	H2C
	GRPC
	TCP
)

func (p Protocol) String() string {
	switch p {
	case Undeclared:
		return "detect"
	case HTTP1:
		return "http/1.1"
	case H2C:
		return "h2c"
	case GRPC:
		return "grpc"
	case TCP:
		return "tcp"
	}
	return "unknown"
}

// IsHTTP reports whether p is parsed as HTTP.
func (p Protocol) IsHTTP() bool { return p == HTTP1 || p == H2C || p == GRPC }

// DeclaredProtocol maps a Service port's appProtocol to a Protocol. An empty
// appProtocol means Undeclared. Values Kubernetes and Istio use for HTTP are
// recognised (case-insensitively where Istio is); everything else, including
// TLS, websockets and unknown values, is TCP: a port is only parsed when
// nothing says it is something other than HTTP.
func DeclaredProtocol(appProtocol string) Protocol {
	switch strings.ToLower(appProtocol) {
	case "":
		return Undeclared
	case "http", "http1", "http/1.1":
		return HTTP1
	case "kubernetes.io/h2c", "http2", "h2c":
		return H2C
	case "grpc":
		return GRPC
	}
	return TCP
}
