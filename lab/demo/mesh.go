package demo

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/policy"
	policyv1alpha1 "github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/spec"
	"github.com/nodemesh/nodemesh/lab/workload"
	"github.com/nodemesh/nodemesh/manifests"
	"github.com/nodemesh/nodemesh/redirect"
)

// MeshSpecFile is the name of the mesh demo's lab spec in this directory.
const MeshSpecFile = "lab/demo/mesh-demo.yaml"

//go:embed mesh-demo.yaml
var meshSpec []byte

// MeshSpec parses the mesh demo's lab: two enrolled namespaces (shop,
// client) and one outside the mesh (outside).
func MeshSpec() (*spec.Spec, error) { return spec.Parse(MeshSpecFile, meshSpec) }

// The pods and service the mesh steps use (all in MeshSpec).
const (
	meshClient   = "client/client-1" // enrolled, node-1
	meshServer   = "shop/web-2"      // enrolled, node-2
	meshPeer     = "shop/web-1"      // enrolled, node-1, same namespace as the server
	meshOutsider = "outside/outsider-1"
	meshService  = "shop/web"
	meshPort     = 8080
	td           = "spiffe://cluster.local"
)

// MeshOptions configure MeshSteps.
type MeshOptions struct {
	AgentBinary, CABinary string
}

// meshDemo is the state the mesh steps share.
type meshDemo struct {
	o MeshOptions
	m *mesh.Mesh
}

// MeshSteps is the mesh demo: the lab with its enrollment, the mesh
// starting, enrolled traffic across nodes with the identities the agents
// logged, the underlay carrying only TLS, a plaintext client outside the
// mesh (PERMISSIVE), L7 authorization on one Service, a NetworkPolicy
// denying a flow with the live explain,
// and the mesh stopping. It needs the pods of MeshSpec.
func MeshSteps(o MeshOptions) []Step {
	d := &meshDemo{o: o}
	return []Step{
		{Name: "the lab and which namespaces are in the mesh", Run: d.showLab},
		{Name: "the mesh starts: CA, one agent per node, capture verified per enrolled pod", Run: d.start},
		{Name: "enrolled to enrolled across nodes, by pod IP and by ClusterIP, with the identities from the access logs", Run: d.requests},
		{Name: "the underlay carries only TLS", Run: d.underlay},
		{Name: "a pod outside the mesh reaches an enrolled pod (PERMISSIVE, plaintext captured by 15006)", Run: d.permissive},
		{Name: "L7 for one Service: requests authorised one by one (403 keeps the connection)", Run: d.l7},
		{Name: "a NetworkPolicy denies a flow; live policy explain", Run: d.policy},
		{Name: "the mesh stops", Run: d.stop},
	}
}

func (d *meshDemo) showLab(ctx context.Context, env *Env) error {
	Status(env.Out, env.Lab)
	env.Printf("\n")
	nss, err := env.Lab.Server.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("listing namespaces: %w", err)
	}
	podsIn := map[string][]string{}
	for _, p := range env.Lab.Pods() {
		podsIn[p.Namespace] = append(podsIn[p.Namespace], p.Name)
	}
	tw := tabwriter.NewWriter(env.Out, 2, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "NAMESPACE\t%s\tIN THE MESH\tPODS\n", state.LabelMode)
	var in, out int
	for _, ns := range nss.Items {
		if len(podsIn[ns.Name]) == 0 {
			continue
		}
		mode := ns.Labels[state.LabelMode]
		enrolled := mode == state.ModeEnabled
		if enrolled {
			in++
		} else {
			out++
		}
		if mode == "" {
			mode = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", ns.Name, mode, yesNo(enrolled), strings.Join(podsIn[ns.Name], ","))
	}
	tw.Flush()
	if in == 0 || out == 0 {
		return fmt.Errorf("the mesh demo needs a namespace in the mesh and one outside it (found %d and %d); use its own spec (%s, the default of `lab demo`)", in, out, MeshSpecFile)
	}
	return nil
}

func (d *meshDemo) start(ctx context.Context, env *Env) error {
	if d.o.AgentBinary == "" || d.o.CABinary == "" {
		return errors.New("no nodemesh-agent / nodemesh-ca binary (run `make build`, or pass --agent-bin and --ca-bin)")
	}
	begin := time.Now()
	m, err := mesh.Start(ctx, env.Lab, mesh.Options{AgentBinary: d.o.AgentBinary, CABinary: d.o.CABinary, Log: env.Log})
	if err != nil {
		return err
	}
	d.m = m
	env.Printf("   CA on %s at %s (log %s)\n", m.CANode, m.CAAddr, m.CALog)
	nodes := sortedNodes(m)
	for _, node := range nodes {
		a := m.Agents[node]
		env.Printf("   agent on %s: pid %d, admin %s inside the node, log and access log %s\n", node, a.Pid, mesh.AdminURL, a.Log)
	}
	env.Printf("   ready, with every enrolled pod's capture verified, in %s; the agents' /config_dump/capture:\n", time.Since(begin).Round(10*time.Millisecond))
	tw := tabwriter.NewWriter(env.Out, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "   NODE\tPOD\tCAPTURE")
	accel := map[string]string{}
	for _, node := range nodes {
		cs, err := m.Capture(ctx, node)
		if err != nil {
			return err
		}
		accel[node] = "on"
		if !cs.Acceleration {
			accel[node] = "off: " + cs.AccelerationReason
		}
		if len(cs.Pods) == 0 {
			fmt.Fprintf(tw, "   %s\t-\t-\n", node)
		}
		for _, p := range cs.Pods {
			fmt.Fprintf(tw, "   %s\t%s\t%s\n", node, p.Pod, p.Status)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, node := range nodes {
		env.Printf("   sk_msg acceleration on %s: %s\n", node, accel[node])
	}
	return nil
}

// need returns the running mesh or an error for steps that run without it.
func (d *meshDemo) need() (*mesh.Mesh, error) {
	if d.m == nil {
		return nil, errors.New("the mesh is not running (its step did not run)")
	}
	return d.m, nil
}

func (d *meshDemo) requests(ctx context.Context, env *Env) error {
	m, err := d.need()
	if err != nil {
		return err
	}
	src, err := env.Lab.Pod(meshClient)
	if err != nil {
		return err
	}
	dst, err := env.Lab.Pod(meshServer)
	if err != nil {
		return err
	}
	svc, err := env.Lab.Service(meshService)
	if err != nil {
		return err
	}
	if src.Node == dst.Node {
		return fmt.Errorf("%s and %s are on the same node; the demo spec changed", src.Key(), dst.Key())
	}
	// Access-log positions before the requests, to show only new records.
	before := map[string]int{}
	for _, node := range []string{src.Node, dst.Node} {
		recs, err := m.AccessLog(node)
		if err != nil {
			return err
		}
		before[node] = len(recs)
	}
	url := fmt.Sprintf("http://%s:%d/by-pod-ip", dst.IP, meshPort)
	env.Printf("   %s (%s, %s) -> GET %s\n", src.Key(), src.Node, src.IP, url)
	r, err := meshGet(ctx, env, src.Key(), url)
	if err != nil {
		return err
	}
	if err := deliveredByAgent(r, dst.Key(), src.IP); err != nil {
		return err
	}
	if transparentDelivery() == nil {
		env.Printf("   answered by %s on %s; it saw the connection come from %s, the client itself: the destination agent delivered it with a transparent socket (mark %#x on the server's socket)\n", r.Pod, r.Node, r.Remote, r.Mark)
	} else {
		env.Printf("   answered by %s on %s; it saw the connection come from %s, its own address: this kernel has no transparent delivery (before Linux 5.17), so the destination agent delivered it from the pod's IP\n", r.Pod, r.Node, r.Remote)
	}

	port := int32(0)
	for _, p := range svc.Ports {
		port = p.Port
		break
	}
	url = fmt.Sprintf("http://%s:%d/by-cluster-ip", svc.ClusterIP, port)
	env.Printf("   %s -> GET %s (service %s), until an answer from %s\n", src.Key(), url, svc.Key(), dst.Key())
	answered := map[string]int{}
	for i := 0; i < 20 && answered[dst.Key()] == 0; i++ {
		r, err := meshGet(ctx, env, src.Key(), url)
		if err != nil {
			return err
		}
		p, err := env.Lab.Pod(r.Pod)
		if err != nil {
			return fmt.Errorf("answer from unknown pod %q: %w", r.Pod, err)
		}
		if err := deliveredByAgent(r, p.Key(), src.IP); err != nil {
			return err
		}
		answered[r.Pod+" on "+r.Node]++
		if r.Pod == dst.Key() {
			answered[dst.Key()]++
		}
	}
	if answered[dst.Key()] == 0 {
		return fmt.Errorf("20 requests to %s never reached %s: %v", url, dst.Key(), answered)
	}
	delete(answered, dst.Key())
	for k, n := range answered {
		env.Printf("     answered by %-28s %d time(s), delivered by the agents\n", k, n)
	}

	wantSrc, wantDst := td+"/ns/client/sa/client", td+"/ns/shop/sa/web"
	for _, side := range []struct{ node, reporter string }{{src.Node, "source"}, {dst.Node, "destination"}} {
		var rec *mesh.AccessRecord
		err := eventually(ctx, 20*time.Second, func() error {
			recs, err := m.AccessLog(side.node)
			if err != nil {
				return err
			}
			for i := len(recs) - 1; i >= before[side.node]; i-- {
				x := recs[i]
				if x.Msg == "connection" && x.Reporter == side.reporter && x.SrcSPIFFEID == wantSrc && x.DstSPIFFEID == wantDst &&
					x.Security == "mutual_tls" && x.BytesSent > 0 && x.BytesReceived > 0 && hostOf(x.Dst) == dst.IP {
					rec = &x
					return nil
				}
			}
			return fmt.Errorf("no access-log record by the %s agent on %s of an mTLS connection %s -> %s to %s among %d new records",
				side.reporter, side.node, wantSrc, wantDst, dst.IP, len(recs)-before[side.node])
		})
		if err != nil {
			return err
		}
		env.Printf("   %s agent (%s) access log: %s -> %s, %s, %s => %s, sent %d B, received %d B\n",
			side.reporter, side.node, rec.Src, rec.Dst, rec.Security, rec.SrcSPIFFEID, rec.DstSPIFFEID, rec.BytesSent, rec.BytesReceived)
	}
	return nil
}

func (d *meshDemo) underlay(ctx context.Context, env *Env) error {
	if _, err := d.need(); err != nil {
		return err
	}
	src, err := env.Lab.Pod(meshClient)
	if err != nil {
		return err
	}
	dst, err := env.Lab.Pod(meshServer)
	if err != nil {
		return err
	}
	n, err := env.Lab.Node(src.Node)
	if err != nil {
		return err
	}
	marker := fmt.Sprintf("NODEMESH-DEMO-SECRET-%d", time.Now().UnixNano())
	pcap := filepath.Join(env.Lab.StateDir(), "mesh", "underlay-mtls.pcap")
	sn, err := mesh.Sniff(n.Link, pcap)
	if err != nil {
		return err
	}
	url := fmt.Sprintf("http://%s:%d/%s", dst.IP, meshPort, marker)
	_, reqErr := meshGet(ctx, env, src.Key(), url)
	frames, err := sn.Stop()
	if reqErr != nil {
		return reqErr
	}
	if err != nil {
		return err
	}
	rep, err := mesh.Summarise(frames, []byte(marker))
	if err != nil {
		return err
	}
	env.Printf("   captured %s (%s's link on the underlay bridge) during GET %s from %s\n", pcap, src.Node, url, src.Key())
	env.Printf("   %d frames; %d TCP segments with payload on port 15008 (HBONE, %d bytes), %d of them start with a TLS record header; %d frames contain %q\n",
		rep.Frames, rep.HBONE, rep.HBONEPayload, rep.TLSRecords, rep.MarkerFrames, marker)
	env.Printf("   (read it with: tcpdump -nr %s)\n", pcap)
	switch {
	case rep.HBONE == 0:
		return fmt.Errorf("no HBONE (port 15008) traffic in the capture of %s: the request did not go through the mesh, or the capture is broken", n.Link)
	case rep.TLSRecords == 0:
		return errors.New("the HBONE segments carry no TLS records")
	case rep.MarkerFrames > 0:
		return fmt.Errorf("the request's marker crossed the underlay in plaintext in %d frame(s)", rep.MarkerFrames)
	}
	return nil
}

func (d *meshDemo) permissive(ctx context.Context, env *Env) error {
	m, err := d.need()
	if err != nil {
		return err
	}
	src, err := env.Lab.Pod(meshOutsider)
	if err != nil {
		return err
	}
	dst, err := env.Lab.Pod(meshServer)
	if err != nil {
		return err
	}
	n, err := env.Lab.Node(src.Node)
	if err != nil {
		return err
	}
	recs, err := m.AccessLog(dst.Node)
	if err != nil {
		return err
	}
	before := len(recs)
	marker := fmt.Sprintf("NODEMESH-DEMO-PLAIN-%d", time.Now().UnixNano())
	pcap := filepath.Join(env.Lab.StateDir(), "mesh", "underlay-plaintext.pcap")
	sn, err := mesh.Sniff(n.Link, pcap)
	if err != nil {
		return err
	}
	url := fmt.Sprintf("http://%s:%d/%s", dst.IP, meshPort, marker)
	env.Printf("   %s (not in the mesh, %s) -> GET %s\n", src.Key(), src.IP, url)
	r, reqErr := meshGet(ctx, env, src.Key(), url)
	frames, err := sn.Stop()
	if reqErr != nil {
		return fmt.Errorf("a plaintext client was refused by a PERMISSIVE pod: %w", reqErr)
	}
	if err != nil {
		return err
	}
	if err := deliveredByAgent(r, dst.Key(), src.IP); err != nil {
		return err
	}
	env.Printf("   answered by %s; it saw the connection come from %s: the agent's inbound plaintext listener (15006) took it and delivered it from the client's address\n", r.Pod, r.Remote)
	rep, err := mesh.Summarise(frames, []byte(marker))
	if err != nil {
		return err
	}
	env.Printf("   on the underlay (%s): %d frames contain the marker in plaintext, as expected outside the mesh\n", pcap, rep.MarkerFrames)
	if rep.MarkerFrames == 0 {
		return errors.New("the plaintext marker is not in the capture: the capture is broken, so the TLS check above proves nothing")
	}
	return eventually(ctx, 20*time.Second, func() error {
		recs, err := m.AccessLog(dst.Node)
		if err != nil {
			return err
		}
		for i := len(recs) - 1; i >= before; i-- {
			x := recs[i]
			if x.Msg == "connection" && x.Reporter == "destination" && hostOf(x.Src) == src.IP && hostOf(x.Dst) == dst.IP {
				if x.SrcSPIFFEID != "" || x.Security == "mutual_tls" {
					return fmt.Errorf("the plaintext connection was logged with a peer identity: %s", x.Line)
				}
				env.Printf("   destination agent (%s) access log: %s -> %s, security %q, source identity none, destination %s\n",
					dst.Node, x.Src, x.Dst, x.Security, x.DstSPIFFEID)
				return nil
			}
		}
		return fmt.Errorf("no access-log record on %s of the plaintext connection from %s", dst.Node, src.IP)
	})
}

func (d *meshDemo) policy(ctx context.Context, env *Env) error {
	m, err := d.need()
	if err != nil {
		return err
	}
	src, err := env.Lab.Pod(meshClient)
	if err != nil {
		return err
	}
	dst, err := env.Lab.Pod(meshServer)
	if err != nil {
		return err
	}
	peer, err := env.Lab.Pod(meshPeer)
	if err != nil {
		return err
	}
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "web-from-shop-only", Namespace: dst.Namespace},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
				NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "shop"}}}}}},
		}}
	recs, err := m.AccessLog(dst.Node)
	if err != nil {
		return err
	}
	before := len(recs)
	if _, err := env.Lab.Server.Client.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating NetworkPolicy %s/%s: %w", np.Namespace, np.Name, err)
	}
	env.Printf("   applied NetworkPolicy %s/%s: pods app=web accept ingress only from namespaces team=shop\n", np.Namespace, np.Name)
	url := fmt.Sprintf("http://%s:%d/denied", dst.IP, meshPort)
	var refusal error
	begin := time.Now()
	err = eventually(ctx, 30*time.Second, func() error {
		r, err := meshGet(ctx, env, src.Key(), url, "--timeout", "3s")
		if err == nil {
			return fmt.Errorf("%s still reaches %s: %+v", src.Key(), dst.Key(), r)
		}
		refusal = err
		return nil
	})
	if err != nil {
		return err
	}
	env.Printf("   %s -> GET %s now fails (%s after the apply): %s\n", src.Key(), url, time.Since(begin).Round(10*time.Millisecond), firstLine(refusal.Error()))
	r, err := meshGet(ctx, env, peer.Key(), fmt.Sprintf("http://%s:%d/allowed", dst.IP, meshPort))
	if err != nil {
		return fmt.Errorf("%s (namespace shop) should still reach %s: %w", peer.Key(), dst.Key(), err)
	}
	env.Printf("   %s -> %s is still allowed: answered by %s\n", peer.Key(), dst.Key(), r.Pod)
	err = eventually(ctx, 20*time.Second, func() error {
		recs, err := m.AccessLog(dst.Node)
		if err != nil {
			return err
		}
		for i := len(recs) - 1; i >= before; i-- {
			x := recs[i]
			if x.Msg == "connection refused" && x.Reporter == "destination" && hostOf(x.Dst) == dst.IP && x.SrcSPIFFEID == td+"/ns/client/sa/client" &&
				strings.Contains(x.CloseReason, np.Name) {
				env.Printf("   destination agent (%s) access log: %s %s -> %s from %s: %s\n", dst.Node, x.Msg, x.Src, x.Dst, x.SrcSPIFFEID, x.CloseReason)
				return nil
			}
		}
		return fmt.Errorf("no %q record on %s naming %s for the denied connection: the request failed for another reason", "connection refused", dst.Node, np.Name)
	})
	if err != nil {
		return err
	}
	q := mesh.ExplainQuery{Src: src.Key(), Dst: dst.Key(), Port: meshPort, Principal: td + "/ns/client/sa/client", Direction: "ingress"}
	dec, err := m.Explain(ctx, dst.Node, q)
	if err != nil {
		return err
	}
	env.Printf("   nodemeshctl policy explain --agent %s --src %s --dst %s --port %d --principal %s --direction ingress   (inside %s)\n",
		mesh.AdminURL, q.Src, q.Dst, q.Port, q.Principal, dst.Node)
	for line := range strings.SplitSeq(strings.TrimRight(dec.Text(), "\n"), "\n") {
		env.Printf("     %s\n", line)
	}
	if dec.Verdict != policy.Deny {
		return fmt.Errorf("the agent on %s explains the flow as %s, but it was refused", dst.Node, dec.Verdict)
	}
	if !strings.Contains(dec.Text(), np.Name) {
		return fmt.Errorf("the explanation does not name NetworkPolicy %s", np.Name)
	}
	return nil
}

func (d *meshDemo) stop(ctx context.Context, env *Env) error {
	m, err := d.need()
	if err != nil {
		return err
	}
	agents := map[string]int{}
	for node, a := range m.Agents {
		agents[node] = a.Pid
	}
	begin := time.Now()
	if err := m.Stop(ctx); err != nil {
		return err
	}
	d.m = nil
	for _, node := range sortedKeys(agents) {
		env.Printf("   agent on %s (pid %d) stopped\n", node, agents[node])
	}
	env.Printf("   CA stopped; mesh down in %s\n", time.Since(begin).Round(10*time.Millisecond))
	for _, p := range env.Lab.Processes() {
		if p.Name == mesh.AgentProcess || p.Name == mesh.CAProcess {
			if env.Lab.Running(p) {
				return fmt.Errorf("%s on %s (pid %d) is still running", p.Name, p.Node, p.Pid)
			}
		}
	}
	return nil
}

// meshGet is Get with the built-in client's flags before the URL.
func meshGet(ctx context.Context, env *Env, from, url string, flags ...string) (workload.Reply, error) {
	argv := append([]string{"nodemeshctl", "lab", "workload", "get"}, flags...)
	out, err := env.Lab.Exec(ctx, from, append(argv, url))
	if err != nil {
		return workload.Reply{}, fmt.Errorf("GET %s from %s: %w", url, from, err)
	}
	var r workload.Reply
	if err := json.Unmarshal(out, &r); err != nil {
		return r, fmt.Errorf("decoding the reply from %s: %w: %q", url, err, out)
	}
	return r, nil
}

// deliveredByAgent is CheckDelivered for the demo's steps.
func deliveredByAgent(r workload.Reply, pod, src string) error { return CheckDelivered(r, pod, src) }

// transparentDelivery is this kernel's support for transparent inbound
// delivery, probed once.
var transparentDelivery = sync.OnceValue(redirect.ProbeTransparentDelivery)

// CheckDelivered checks that the reply came from pod and that the
// destination agent delivered the connection, as it does on the kernel
// this runs on (docs/capture.md): with transparent delivery (Linux 5.17+)
// the application saw the client's own address src, on a socket carrying
// the agent's delivery mark, which a direct connection never has; without
// it (the fallback) the application saw its own address of the
// connection's family, since the agent dials from inside the pod then,
// which a connection from any other pod or node cannot look like.
func CheckDelivered(r workload.Reply, pod, src string) error {
	return checkDelivered(r, pod, src, transparentDelivery())
}

// checkDelivered is CheckDelivered on a kernel whose probe returned probe.
func checkDelivered(r workload.Reply, pod, src string, probe error) error {
	if r.Pod != pod {
		return fmt.Errorf("the answer came from %s, not %s", r.Pod, pod)
	}
	switch err := probe; {
	case errors.Is(err, ebpf.ErrNotSupported):
		if hostOf(r.Remote) != hostOf(r.Local) {
			return fmt.Errorf("%s saw the connection come from %s, not from its own address %s as the agent delivers without transparent delivery (%v)", pod, r.Remote, hostOf(r.Local), err)
		}
		return nil
	case err != nil:
		return err
	}
	if hostOf(r.Remote) != src {
		return fmt.Errorf("%s saw the connection come from %s, not from the client %s", pod, r.Remote, src)
	}
	if r.Mark != redirect.DefaultDeliverMark {
		return fmt.Errorf("%s's connection from %s has mark %#x, not the agent's delivery mark %#x: it did not go through the mesh", pod, r.Remote, r.Mark, redirect.DefaultDeliverMark)
	}
	return nil
}

func eventually(ctx context.Context, d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", d, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %w)", ctx.Err(), err)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func hostOf(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func sortedNodes(m *mesh.Mesh) []string {
	out := make([]string, 0, len(m.Agents))
	for n := range m.Agents {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func sortedKeys(m map[string]int) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// l7 opts the web Service in to L7 with an AuthorizationPolicy that lets
// the client namespace GET /public/* only: allowed and denied requests on
// one connection, the path decided as the application sees it. It removes
// both afterwards, so the next steps see the mesh at L4 again.
func (d *meshDemo) l7(ctx context.Context, env *Env) error {
	if _, err := d.need(); err != nil {
		return err
	}
	c := env.Lab.Server.Client
	dyn, err := dynamic.NewForConfig(env.Lab.Server.REST)
	if err != nil {
		return err
	}
	crds, err := manifests.CRDs()
	if err != nil {
		return err
	}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("installing CRD %s: %w", crd.GetName(), err)
		}
	}
	svc, err := env.Lab.Service(meshService)
	if err != nil {
		return err
	}
	ns, name, _ := strings.Cut(meshService, "/")
	setLabel := func(v string) error {
		s, err := c.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if s.Labels == nil {
			s.Labels = map[string]string{}
		}
		if v == "" {
			delete(s.Labels, l7.LabelL7)
		} else {
			s.Labels[l7.LabelL7] = v
		}
		_, err = c.CoreV1().Services(ns).Update(ctx, s, metav1.UpdateOptions{})
		return err
	}
	apRes := dyn.Resource(policyv1alpha1.AuthorizationPolicyResource).Namespace(ns)
	ap := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "web-public", "namespace": ns},
		"spec": map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "web"}},
			"rules": []any{map[string]any{
				"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{"client"}}}},
				"to":   []any{map[string]any{"operation": map[string]any{"methods": []any{"GET"}, "paths": []any{"/public/*"}}}},
			}},
		},
	}}
	if err := eventually(ctx, 30*time.Second, func() error {
		_, err := apRes.Create(ctx, ap, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil
		}
		return err
	}); err != nil {
		return fmt.Errorf("creating AuthorizationPolicy %s/web-public: %w", ns, err)
	}
	if err := setLabel(l7.ValueEnabled); err != nil {
		return fmt.Errorf("labelling Service %s: %w", meshService, err)
	}
	env.Printf("   labelled Service %s %s=%s, and applied AuthorizationPolicy %s/web-public:\n", meshService, l7.LabelL7, l7.ValueEnabled, ns)
	env.Printf("     pods app=web: namespace client may GET /public/* (methods, paths: L7 fields, decided per request)\n")
	base := fmt.Sprintf("http://%s:80", svc.ClusterIP)
	paths := []string{"/public/hello", "/admin", "/public/../admin", "/public//hello/./again"}
	var results []workload.Result
	err = eventually(ctx, 60*time.Second, func() error {
		var urls []string
		for _, p := range paths {
			urls = append(urls, base+p)
		}
		out, err := env.Lab.Exec(ctx, meshClient, append([]string{"nodemeshctl", "lab", "workload", "requests"}, urls...))
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		results = results[:0]
		for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
			var r workload.Result
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				return fmt.Errorf("decoding %q: %w", line, err)
			}
			results = append(results, r)
		}
		if len(results) != len(paths) || results[0].Status != 200 || results[1].Status != 403 || results[2].Status != 403 || results[3].Status != 200 {
			return fmt.Errorf("not in force yet: %+v", results)
		}
		return nil
	})
	if err != nil {
		return err
	}
	env.Printf("   %s -> %s, four requests on one kept-alive connection:\n", meshClient, base)
	for i, r := range results {
		what := strings.TrimSpace(r.Body)
		if r.Status == 200 {
			var reply workload.Reply
			if err := json.Unmarshal([]byte(r.Body), &reply); err == nil {
				what = fmt.Sprintf("answered by %s, which saw the path %s", reply.Pod, reply.Path)
			}
		}
		conn := "new connection"
		if r.Reused {
			conn = "same connection"
		}
		env.Printf("     GET %-24s %d  %s (%s)\n", paths[i], r.Status, what, conn)
	}
	// Back to L4 for the next steps.
	if err := apRes.Delete(ctx, "web-public", metav1.DeleteOptions{}); err != nil {
		return err
	}
	if err := setLabel(""); err != nil {
		return err
	}
	return eventually(ctx, 60*time.Second, func() error {
		_, err := meshGet(ctx, env, meshPeer, base+"/admin")
		return err
	})
}
