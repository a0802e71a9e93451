// Command nodemesh-cni is nodemesh's chained CNI plugin. The container
// runtime runs it after the pod network's own plugin for every pod sandbox:
// on ADD it hands the pod's network namespace to the node's nodemesh agent
// (agent/cni) and returns only once the agent has enrolled the pod in
// capture, or has answered that it does not mesh the pod, so no container
// of a meshed pod ever runs before its capture. When the agent cannot be
// reached the plugin has no API access of its own: it reads the agent's
// last namespace table (agent/cni.NamespaceTable, beside the socket) and
// starts the pods of namespaces listed there outside the mesh; every other
// pod outside excludeNamespaces fails its ADD ("try again later", fail
// closed) and kubelet retries the sandbox until the agent is back. The
// previous plugin's result is passed through unchanged.
//
// Configuration (the entry the agent's installer adds to the node's
// conflist; docs/capture.md):
//
//	{"type": "nodemesh-cni", "socket": "/var/run/nodemesh/cni.sock",
//	 "excludeNamespaces": ["kube-system", "nodemesh-system"], "timeout": "30s",
//	 "holdWhenAgentDown": "meshed"}
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/nodemesh/nodemesh/agent/cni"
)

func main() {
	os.Exit(run(os.Getenv, os.Stdin, os.Stdout, os.Stderr))
}

// run is the plugin, with its environment, stdin and outputs passed in.
func run(getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) int {
	cmd := getenv("CNI_COMMAND")
	if cmd == "VERSION" {
		_ = json.NewEncoder(stdout).Encode(map[string]any{"cniVersion": "1.0.0", "supportedVersions": supportedVersions})
		return 0
	}
	if cmd == "" {
		// Run by hand: say what it is rather than print a CNI error.
		fmt.Fprintln(stderr, "nodemesh-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND set (docs/capture.md)")
		return 2
	}
	out, err := handle(cmd, getenv, stdin, stderr)
	if err != nil {
		var ce *cniError
		if !errors.As(err, &ce) {
			ce = errorf(codeNotEnrolled, err.Error(), nil)
		}
		if ce.CNIVersion == "" {
			ce.CNIVersion = "1.0.0"
		}
		_ = json.NewEncoder(stdout).Encode(ce)
		return 1
	}
	if out != nil {
		_, _ = stdout.Write(append(out, '\n'))
	}
	return 0
}

// handle runs one command and returns what to print on success.
func handle(cmd string, getenv func(string) string, stdin io.Reader, stderr io.Writer) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(stdin, 1<<20))
	if err != nil {
		return nil, errorf(codeDecoding, "reading the network configuration", err)
	}
	conf, err := parseConf(b)
	if err != nil {
		return nil, err
	}
	withVersion := func(err error) error {
		var ce *cniError
		if errors.As(err, &ce) {
			ce.CNIVersion = conf.CNIVersion
			return ce
		}
		return err
	}
	switch cmd {
	case "ADD":
		out, err := add(conf, getenv, stderr)
		return out, withVersion(err)
	case "DEL":
		del(conf, getenv)
		return nil, nil
	case "CHECK":
		// The agent keeps the pod captured for its life; CHECK asks only
		// that the chain is whole.
		if len(conf.PrevResult) == 0 {
			return nil, withVersion(errorf(codeInvalidConfig, "CHECK without prevResult", nil))
		}
		return nil, nil
	}
	return nil, withVersion(errorf(codeInvalidEnv, fmt.Sprintf("CNI_COMMAND %q is not supported (ADD, DEL, CHECK, VERSION)", cmd), nil))
}

// add is CNI ADD: pass the previous result through once the agent has the
// pod enrolled or does not mesh it.
func add(conf *netConf, getenv func(string) string, stderr io.Writer) ([]byte, error) {
	if len(conf.PrevResult) == 0 {
		return nil, errorf(codeInvalidConfig, "no prevResult: nodemesh-cni must be chained after the pod network's plugin in a conflist", nil)
	}
	out, err := passThrough(conf)
	if err != nil {
		return nil, err
	}
	args, err := parseArgs(getenv("CNI_ARGS"))
	if err != nil {
		return nil, errorf(codeInvalidEnv, "reading CNI_ARGS", err)
	}
	if args.Namespace == "" || args.Name == "" {
		return out, nil // not a Kubernetes pod: nothing to mesh
	}
	if slices.Contains(conf.ExcludeNamespaces, args.Namespace) {
		return out, nil
	}
	req, err := addRequest(conf, getenv, args)
	if err != nil {
		return nil, err
	}
	netns, err := os.Open(getenv("CNI_NETNS"))
	if err != nil {
		return nil, errorf(codeInvalidEnv, "opening the pod's network namespace (CNI_NETNS)", err)
	}
	defer netns.Close()
	if err := cni.IsNetns(netns); err != nil {
		return nil, errorf(codeInvalidEnv, "CNI_NETNS "+getenv("CNI_NETNS"), err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	rep, err := cni.Send(ctx, conf.Socket, req, netns)
	if err != nil {
		if errors.Is(err, cni.ErrAgentUnreachable) {
			why := startWithoutAgent(conf, req.Namespace)
			if why == "" {
				fmt.Fprintf(stderr, "nodemesh-cni: pod %s started without the agent (unreachable: %v): its namespace is outside the mesh in the agent's last namespace table\n", req.Pod(), err)
				return out, nil
			}
			return nil, errorf(codeTryAgainLater, fmt.Sprintf("pod %s not started: the nodemesh agent is not reachable, and %s (kubelet retries; is the nodemesh-agent pod running on this node?)", req.Pod(), why), err)
		}
		return nil, errorf(codeNotEnrolled, fmt.Sprintf("pod %s not started: not enrolled in the mesh in time", req.Pod()), err)
	}
	switch {
	case rep.Error != "":
		return nil, errorf(codeNotEnrolled, fmt.Sprintf("pod %s not started: the nodemesh agent could not enroll it", req.Pod()), errors.New(rep.Error))
	case rep.Result == cni.ResultEnrolled || rep.Result == cni.ResultSkipped:
		return out, nil
	}
	return nil, errorf(codeNotEnrolled, fmt.Sprintf("pod %s not started: unexpected answer %q from the nodemesh agent", req.Pod(), rep.Result), nil)
}

// startWithoutAgent decides a pod's ADD while the agent cannot be reached:
// "" lets the pod start, anything else says why it must wait.
func startWithoutAgent(conf *netConf, namespace string) string {
	if conf.HoldWhenAgentDown == cni.HoldAll {
		return "the plugin holds every pod back while the agent is down (holdWhenAgentDown: all)"
	}
	path := cni.NamespaceTablePath(conf.Socket)
	t, err := cni.ReadNamespaceTable(path)
	if err != nil {
		return fmt.Sprintf("the agent's namespace table cannot tell whether the pod is meshed (%v)", err)
	}
	if !t.IsUnmeshed(namespace) {
		return fmt.Sprintf("namespace %s is in the mesh (or unknown) in the agent's namespace table of %s", namespace, t.Written.UTC().Format(time.RFC3339))
	}
	return ""
}

// addRequest checks the environment of an ADD and builds the request.
func addRequest(conf *netConf, getenv func(string) string, args podArgs) (cni.Request, error) {
	req := cni.Request{Command: cni.CommandAdd, Namespace: args.Namespace, Name: args.Name, UID: args.UID,
		ContainerID: getenv("CNI_CONTAINERID")}
	if getenv("CNI_NETNS") == "" {
		return req, errorf(codeInvalidEnv, fmt.Sprintf("pod %s: CNI_NETNS is empty; nodemesh-cni needs the pod's network namespace", req.Pod()), nil)
	}
	if req.ContainerID == "" {
		return req, errorf(codeInvalidEnv, fmt.Sprintf("pod %s: CNI_CONTAINERID is empty", req.Pod()), nil)
	}
	ips, err := prevIPs(conf.PrevResult)
	if err != nil {
		return req, errorf(codeDecoding, fmt.Sprintf("pod %s", req.Pod()), err)
	}
	req.IPs = ips
	if err := req.Validate(); err != nil {
		return req, errorf(codeInvalidEnv, fmt.Sprintf("pod %s", req.Pod()), err)
	}
	return req, nil
}

// del is CNI DEL: tell the agent the sandbox is going, best effort (DEL
// must succeed even when the agent is gone, or the runtime never frees the
// sandbox).
func del(conf *netConf, getenv func(string) string) {
	args, err := parseArgs(getenv("CNI_ARGS"))
	if err != nil || args.Namespace == "" || args.Name == "" || getenv("CNI_CONTAINERID") == "" ||
		slices.Contains(conf.ExcludeNamespaces, args.Namespace) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, _ = cni.Send(ctx, conf.Socket, cni.Request{Command: cni.CommandDel, Namespace: args.Namespace, Name: args.Name,
		UID: args.UID, ContainerID: getenv("CNI_CONTAINERID")}, nil)
}
