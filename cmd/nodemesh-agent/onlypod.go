package main

import (
	"errors"
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Per-pod mode (--only-pod): the agent serves only the named pods of its
// node, as a sidecar proxy would, with the same code and capture as the
// node agent. Each such agent needs its own --cgroup-root (the pod's
// cgroup directory, so capture sees only that pod's sockets),
// --bpf-pin-dir and admin/metrics/readiness addresses. It does not hold
// the node mark (agent/rollout): several per-pod agents on one node would
// overwrite each other's holder and one exiting would withdraw the mark
// for the others; whoever deploys per-pod agents marks the node
// (agent/node).

// onlyPodFlag collects repeated --only-pod values.
type onlyPodFlag struct{ c *Config }

func (f onlyPodFlag) String() string {
	if f.c == nil {
		return ""
	}
	return strings.Join(f.c.OnlyPods, ",")
}

func (f onlyPodFlag) Set(v string) error {
	f.c.OnlyPods = append(f.c.OnlyPods, v)
	return nil
}

// validateOnlyPods checks --only-pod and fills c.onlyPods.
func (c *Config) validateOnlyPods() []error {
	if len(c.OnlyPods) == 0 {
		c.onlyPods = nil
		return nil
	}
	var errs []error
	if !c.Dataplane {
		errs = append(errs, errors.New("--only-pod restricts the data plane's pods; it needs --dataplane=true"))
	}
	c.onlyPods = make(map[string]bool, len(c.OnlyPods))
	for _, v := range c.OnlyPods {
		ns, name, ok := strings.Cut(v, "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			errs = append(errs, fmt.Errorf("--only-pod %q: want NAMESPACE/NAME", v))
			continue
		}
		if msgs := validation.IsDNS1123Label(ns); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("--only-pod %q: namespace: %s", v, strings.Join(msgs, "; ")))
			continue
		}
		if msgs := validation.IsDNS1123Subdomain(name); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("--only-pod %q: pod name: %s", v, strings.Join(msgs, "; ")))
			continue
		}
		c.onlyPods[v] = true
	}
	return errs
}
