package lab

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/nodemesh/nodemesh/lab/netns"
	"github.com/nodemesh/nodemesh/lab/spec"
)

// masqMark marks hairpin connections (a pod reaching itself through its
// service), which must be masqueraded or the pod would drop the reply as a
// martian; kube-proxy uses the same bit.
const masqMark = "0x4000"

// serviceRules renders the nftables table that makes ClusterIPs work in a
// node's namespace the way kube-proxy's nftables mode does: DNAT in
// prerouting (traffic from the node's pods) and output (the node's own
// processes), random choice among ready endpoints, masquerade for hairpin.
// The whole table is replaced in one transaction.
func (l *Lab) serviceRules() string {
	table := l.names.nftTable()
	var b strings.Builder
	fmt.Fprintf(&b, "add table ip %s\ndelete table ip %s\n", table, table)
	fmt.Fprintf(&b, "table ip %s {\n", table)
	b.WriteString("\tchain prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tjump services\n\t}\n")
	b.WriteString("\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n")
	fmt.Fprintf(&b, "\tchain postrouting {\n\t\ttype nat hook postrouting priority 100; policy accept;\n\t\tmeta mark & %s == %s masquerade\n\t}\n", masqMark, masqMark)

	var dispatch []string
	var chains strings.Builder
	keys := make([]string, 0, len(l.st.Spec.Services))
	svcs := map[string]*spec.Service{}
	for i := range l.st.Spec.Services {
		s := &l.st.Spec.Services[i]
		keys = append(keys, s.Key())
		svcs[s.Key()] = s
	}
	sort.Strings(keys)
	for si, key := range keys {
		ss := svcs[key]
		st, ok := l.st.Services[key]
		if !ok || st.ClusterIP == "" || st.ClusterIP == "None" {
			continue
		}
		eps := l.endpointsOf(ss)
		for pi := range ss.Ports {
			svp := &ss.Ports[pi]
			proto := strings.ToLower(svp.Protocol)
			type target struct {
				ip   string
				port int32
			}
			var targets []target
			for _, e := range eps {
				if n, ok := svp.ResolvePort(mustSpecPod(l.st.Spec, e.pod.Key())); ok {
					targets = append(targets, target{e.pod.IP, n})
				}
			}
			if len(targets) == 0 {
				continue // no route to the ClusterIP: clients get "no route to host"
			}
			chain := fmt.Sprintf("svc-%d-%d", si, pi)
			dispatch = append(dispatch, fmt.Sprintf("\t\tip daddr %s %s dport %d jump %s comment \"%s:%s\"", st.ClusterIP, proto, svp.Port, chain, key, portLabel(svp)))
			var vm []string
			for ti, t := range targets {
				ep := fmt.Sprintf("%s-%d", chain, ti)
				vm = append(vm, fmt.Sprintf("%d : jump %s", ti, ep))
				fmt.Fprintf(&chains, "\tchain %s {\n\t\tip saddr %s meta mark set meta mark | %s\n\t\tmeta l4proto %s dnat to %s:%d\n\t}\n", ep, t.ip, masqMark, proto, t.ip, t.port)
			}
			fmt.Fprintf(&chains, "\tchain %s {\n\t\tnumgen random mod %d vmap { %s }\n\t}\n", chain, len(targets), strings.Join(vm, ", "))
		}
	}
	b.WriteString("\tchain services {\n")
	for _, d := range dispatch {
		b.WriteString(d)
		b.WriteByte('\n')
	}
	b.WriteString("\t}\n")
	b.WriteString(chains.String())
	b.WriteString("}\n")
	return b.String()
}

func portLabel(sp *spec.ServicePort) string {
	if sp.Name != "" {
		return sp.Name
	}
	return fmt.Sprint(sp.Port)
}

func mustSpecPod(s *spec.Spec, key string) *spec.Pod {
	p, _ := s.Pod(key)
	if p == nil {
		return &spec.Pod{}
	}
	return p
}

// programServices installs the service table in every node's namespace.
func (l *Lab) programServices(ctx context.Context) error {
	rules := []byte(l.serviceRules())
	for _, n := range sortedNodes(l.st.Nodes) {
		if _, err := netns.Run(ctx, n.Netns, rules, "nft", "-f", "-"); err != nil {
			return fmt.Errorf("programming services on node %s (is nftables installed?): %w", n.Name, err)
		}
	}
	return nil
}
