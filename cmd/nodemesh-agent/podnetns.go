package main

import (
	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/nodeinfo"
	"github.com/nodemesh/nodemesh/agent/state"
)

// sandboxScanner finds the network namespaces of the pods running on this
// node (nodeinfo.Scanner walks /proc for pod UIDs in cgroup paths).
type sandboxScanner interface {
	Scan() (map[string]nodeinfo.Sandbox, map[string]error, error)
}

// scanOnce returns a function that scans /proc at most once per reconcile,
// and only if some pod needs it: a node with only annotated (lab) pods, or
// whose pods were all found before and still live, never walks /proc.
func (dp *dataplane) scanOnce() func() map[string]nodeinfo.Sandbox {
	var (
		done   bool
		result map[string]nodeinfo.Sandbox
	)
	return func() map[string]nodeinfo.Sandbox {
		if done || dp.sandboxes == nil {
			return result
		}
		done = true
		found, errs, err := dp.sandboxes.Scan()
		if err != nil {
			dp.log.Error("finding pods' network namespaces in /proc", "err", err)
			return nil
		}
		for uid, err := range errs {
			// Ambiguous pods are never captured by guesswork.
			dp.log.Warn("pod network namespace not usable", "pod_uid", uid, "err", err)
		}
		result = found
		return result
	}
}

// stillThere reports whether a sandbox found earlier still lives: its
// /proc/<pid>/ns/net link resolves to the same namespace (a recycled pid in
// another namespace has another inode).
func stillThere(sb nodeinfo.Sandbox) bool {
	var st unix.Stat_t
	return unix.Stat(sb.Netns, &st) == nil && st.Ino == sb.NetnsInode
}

// locate fills in where an enrolled local pod lives. The lab's annotations
// are used only with --pod-netns=annotations or auto; with proc they are
// ignored, because anyone who can create a pod can write an annotation.
// (A forged path still could not serve another pod: capture binds 15008 to
// the pod's own IP inside the namespace, which fails elsewhere.) A pod not
// found yet keeps an empty Netns and is retried on the next reconcile.
func (dp *dataplane) locate(p *state.Pod, scan func() map[string]nodeinfo.Sandbox) *state.Pod {
	if !p.Enrolled || !p.Live() || len(p.IPs) == 0 {
		return p
	}
	if p.Netns != "" && dp.podNetns != podNetnsProc {
		return p
	}
	cp := *p // snapshots are immutable: change a copy
	cp.Netns, cp.Cgroup = "", ""
	if p.UID == "" {
		return &cp
	}
	sb, ok := dp.located[p.UID]
	if !ok || !dp.alive(sb) {
		sb, ok = scan()[p.UID]
	}
	if ok {
		if dp.located == nil {
			dp.located = make(map[string]nodeinfo.Sandbox)
		}
		dp.located[p.UID] = sb
		cp.Netns, cp.Cgroup = sb.Netns, sb.Cgroup
	}
	return &cp
}

// forgetLocated drops cached sandboxes of pods no longer on this node.
func (dp *dataplane) forgetLocated(seen map[string]bool) {
	for uid := range dp.located {
		if !seen[uid] {
			delete(dp.located, uid)
		}
	}
}
