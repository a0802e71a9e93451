package nodeinfo

import "fmt"

// Node is what the agent learns about a real node at start-up: where
// capture attaches and how to find a pod's network namespace. The lab
// writes a pod's netns and cgroup into annotations instead (it plays
// kubelet); on a real node the agent asks Node.
type Node struct {
	// Hierarchy is the node's cgroup v2 hierarchy, seen from its cgroup
	// namespace.
	Hierarchy Hierarchy
	// PodsCgroup is where capture attaches: kubelet's kubepods cgroup, or
	// the hierarchy root.
	PodsCgroup string
	// Scanner finds pod sandboxes by UID.
	Scanner *Scanner
}

// DiscoverNode runs the start-up checks for a real node (cfg.RequireHostPID
// and cfg.RequireBPFFS should be set) and, if they pass, returns the node.
// The Report lists every check either way; the error is Report.Err.
func DiscoverNode(cfg PreflightConfig) (*Node, Report, error) {
	rep := Preflight(cfg)
	if err := rep.Err(); err != nil {
		return nil, rep, err
	}
	n := &Node{
		Hierarchy:  rep.Hierarchy,
		PodsCgroup: rep.Hierarchy.PodsCgroup(),
		Scanner: &Scanner{
			Proc:         cfg.Proc,
			Hierarchy:    rep.Hierarchy,
			NodeView:     cfg.RequireHostPID,
			NodeCgroupNS: cfg.NodeCgroupNS,
		},
	}
	return n, rep, nil
}

// PodNetns returns the network namespace path (valid while the pod's
// sandbox process lives) and the cgroup directory of pod uid. The errors
// wrap ErrPodNotFound (not started yet: retry when the pod's status
// changes), ErrHostNetwork (never capture it) or ErrAmbiguousNetns.
func (n *Node) PodNetns(uid string) (netns, cgroup string, err error) {
	sb, err := n.Scanner.Find(uid)
	if err != nil {
		return "", "", err
	}
	f, err := n.Scanner.OpenNetns(sb) // checks the pid was not recycled
	if err != nil {
		return "", "", err
	}
	if err := f.Close(); err != nil {
		return "", "", fmt.Errorf("closing the network namespace of pod %s: %w", uid, err)
	}
	return sb.Netns, sb.Cgroup, nil
}
