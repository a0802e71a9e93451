// Package redirect captures the TCP traffic of enrolled pods with eBPF.
//
// The programs (bpf/capture.c, compiled by bpf2go into capture_bpfel.o)
// are:
//
//   - cgroup/connect4 and cgroup/connect6, attached once at the node's pod
//     cgroup: a TCP connect from an enrolled pod's network namespace is
//     rewritten to the agent's listener at 127.0.0.1:15001 ([::1]:15001) in
//     that namespace; sockets with the agent's SO_MARK, loopback, agent
//     ports, per-pod excluded ports and UDP are left alone;
//   - sockops, which records the original destination for the agent
//     (OriginalDst) and, with same-node acceleration on, puts both ends of
//     a captured connection into a sockhash;
//   - sk_msg on that sockhash, which moves bytes between the two ends;
//   - sk_lookup, attached per enrolled pod namespace, which steers inbound
//     TCP for the pod's IPs to the agent's 15006 listener.
//
// Enrollment is keyed by network namespace cookie. Everything is pinned on
// bpffs, so capture stays in force (and fails closed) while the agent is
// down, and a restarted agent adopts it with atomic link updates. The one
// exception to failing closed: connections from the node's own addresses
// (SetNodeAddrs) to a pod's kubelet probe ports (Pod.NodeProbePorts) reach
// the pod while its 15006 listener is absent, so that an agent restart
// does not fail kubelet's probes.
//
// Typical use by the agent:
//
//	c, err := redirect.Load(ctx, redirect.Config{CgroupRoot: kubepods, Logger: log})
//	for _, p := range c.AdoptedPods() { ... } // re-enroll or UnenrollCookie
//	ep, err := c.Enroll(ctx, redirect.Pod{Name: "ns/pod", Netns: nsPath, Cgroup: cg, IPs: ips})
//	go func() { for { conn, dst, err := ep.AcceptOutbound(ep.Listeners.Outbound[0]); ... } }()
//	err = ep.SelfCheck(ctx)      // capture proven for this pod
//	err = c.Unenroll(ep)
//	err = c.Release()            // restart: keep capture pinned (fail closed)
//	err = c.Close()              // uninstall: detach and unpin everything
//
// See docs/capture.md for the flow, kernel requirements and failure modes.
package redirect
