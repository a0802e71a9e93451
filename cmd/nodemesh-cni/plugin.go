package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/nodemesh/nodemesh/agent/cni"
)

// Supported CNI spec versions. The plugin passes the previous result
// through unchanged, so it needs none of the differences between them.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0"}

// Defaults of the plugin's configuration.
const (
	DefaultSocket  = "/var/run/nodemesh/cni.sock"
	DefaultTimeout = 30 * time.Second
)

// CNI error codes (CNI spec, "Error").
const (
	codeIncompatibleVersion = 1
	codeInvalidEnv          = 4
	codeDecoding            = 6
	codeInvalidConfig       = 7
	codeTryAgainLater       = 11
	// Plugin-specific codes start at 100.
	codeNotEnrolled = 100
)

// cniError is the error document the plugin prints on failure.
type cniError struct {
	CNIVersion string `json:"cniVersion"`
	Code       int    `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details,omitempty"`
}

func (e *cniError) Error() string {
	if e.Details != "" {
		return e.Msg + ": " + e.Details
	}
	return e.Msg
}

func errorf(code int, msg string, details error) *cniError {
	e := &cniError{Code: code, Msg: msg}
	if details != nil {
		e.Details = details.Error()
	}
	return e
}

// netConf is the plugin's entry in the chained configuration list, as the
// runtime passes it on stdin.
type netConf struct {
	CNIVersion string `json:"cniVersion"`
	Name       string `json:"name"`
	Type       string `json:"type"`
	// Socket is the agent's unix socket (the agent's --cni-socket).
	Socket string `json:"socket,omitempty"`
	// ExcludeNamespaces are never sent to the agent: the pods that must
	// start while the agent is down (the agent's own namespace and the
	// cluster's system pods).
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	// Timeout bounds the wait for the agent (a Go duration, default 30s).
	Timeout string `json:"timeout,omitempty"`
	// HoldWhenAgentDown says which pods wait while the agent cannot be
	// reached: "meshed" (default) those the agent's namespace table
	// (agent/cni.NamespaceTable, beside the socket) does not list outside
	// the mesh, "all" every pod outside ExcludeNamespaces.
	HoldWhenAgentDown string `json:"holdWhenAgentDown,omitempty"`
	// PrevResult is the result of the plugins before this one.
	PrevResult json.RawMessage `json:"prevResult,omitempty"`

	timeout time.Duration
}

// parseConf decodes and checks the configuration.
func parseConf(b []byte) (*netConf, error) {
	var c netConf
	if len(b) == 0 {
		return nil, errorf(codeDecoding, "no network configuration on stdin", nil)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, errorf(codeDecoding, "decoding the network configuration", err)
	}
	if c.CNIVersion == "" {
		return nil, errorf(codeInvalidConfig, "the network configuration has no cniVersion", nil)
	}
	if !slices.Contains(supportedVersions, c.CNIVersion) {
		return nil, errorf(codeIncompatibleVersion, fmt.Sprintf("cniVersion %q is not supported (supported: %s)", c.CNIVersion, strings.Join(supportedVersions, ", ")), nil)
	}
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if !strings.HasPrefix(c.Socket, "/") {
		return nil, errorf(codeInvalidConfig, fmt.Sprintf("socket %q: want an absolute path", c.Socket), nil)
	}
	switch c.HoldWhenAgentDown {
	case "":
		c.HoldWhenAgentDown = cni.HoldMeshed
	case cni.HoldMeshed, cni.HoldAll:
	default:
		return nil, errorf(codeInvalidConfig, fmt.Sprintf("holdWhenAgentDown %q: want %q or %q", c.HoldWhenAgentDown, cni.HoldMeshed, cni.HoldAll), nil)
	}
	c.timeout = DefaultTimeout
	if c.Timeout != "" {
		d, err := time.ParseDuration(c.Timeout)
		if err != nil || d <= 0 || d > 10*time.Minute {
			return nil, errorf(codeInvalidConfig, fmt.Sprintf("timeout %q: want a duration between 0 and 10m", c.Timeout), err)
		}
		c.timeout = d
	}
	return &c, nil
}

// prevIPs returns the addresses in the previous result (any CNI version:
// "ips" entries with an "address" in CIDR form).
func prevIPs(raw json.RawMessage) ([]netip.Addr, error) {
	var r struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, fmt.Errorf("decoding prevResult: %w", err)
	}
	var out []netip.Addr
	for _, ip := range r.IPs {
		p, err := netip.ParsePrefix(ip.Address)
		if err != nil {
			return nil, fmt.Errorf("prevResult address %q: %w", ip.Address, err)
		}
		if a := p.Addr().Unmap(); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out, nil
}

// passThrough returns the previous result as this plugin's result, in
// the configuration's version.
func passThrough(c *netConf) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(c.PrevResult, &m); err != nil {
		return nil, errorf(codeDecoding, "decoding prevResult", err)
	}
	if m == nil {
		return nil, errorf(codeDecoding, "prevResult is not a JSON object", nil)
	}
	v, _ := json.Marshal(c.CNIVersion)
	m["cniVersion"] = v
	return json.Marshal(m)
}

// podArgs are the Kubernetes fields of CNI_ARGS.
type podArgs struct {
	Namespace, Name, UID string
}

// parseArgs reads CNI_ARGS ("K1=V1;K2=V2"). Keys other than K8S_POD_*
// are ignored; a malformed pair is an error.
func parseArgs(s string) (podArgs, error) {
	var a podArgs
	if s == "" {
		return a, nil
	}
	for kv := range strings.SplitSeq(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return a, fmt.Errorf("CNI_ARGS: %q is not KEY=VALUE", kv)
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			a.Namespace = v
		case "K8S_POD_NAME":
			a.Name = v
		case "K8S_POD_UID":
			a.UID = v
		}
	}
	return a, nil
}
