package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilversion "k8s.io/apimachinery/pkg/util/version"

	"github.com/nodemesh/nodemesh/agent/version"
	"github.com/nodemesh/nodemesh/cmd/nodemeshctl/internal/cluster"
	"github.com/nodemesh/nodemesh/identity"
)

// MinKubernetes is the oldest API server the manifests support: the
// agent's Lease admission policy needs ValidatingAdmissionPolicy with
// authorizer and request variables as in 1.32 (docs/install.md).
const MinKubernetes = "1.32.0"

// Expiry thresholds of check.
const (
	svidWarn = 5 * time.Minute
	rootWarn = 30 * 24 * time.Hour
	// spiffeRootWarn is for roots from a SPIFFE Workload API. SPIRE's CA
	// is short-lived by design (ca_ttl, default 24h) and rotates itself:
	// it adds the next root to the bundle at half its CA's life, so the
	// newest root always has at least ca_ttl/2 left while the server
	// works. Less than this left on the newest root means rotation
	// stopped.
	spiffeRootWarn = 6 * time.Hour
)

// finding is one result of `check`.
type finding struct {
	Check   string `json:"check"`
	Status  string `json:"status"` // ok, warn, fail
	Node    string `json:"node,omitempty"`
	Message string `json:"message"`
}

type checker struct {
	out []finding
}

func (c *checker) add(check, status, node, format string, args ...any) {
	c.out = append(c.out, finding{Check: check, Status: status, Node: node, Message: fmt.Sprintf(format, args...)})
}

func (c *checker) failed() int {
	n := 0
	for _, f := range c.out {
		if f.Status == "fail" {
			n++
		}
	}
	return n
}

func newCheckCmd(g *globals) *cobra.Command {
	var output string
	c := &cobra.Command{
		Use:   "check",
		Short: "Check the installation: prerequisites, agents, capture, unprotected pods, certificates, CA",
		Long: `check inspects the cluster and every agent and reports, one line each:

  kubernetes     the API server's version (1.32 or later) and the
                 ValidatingAdmissionPolicy API and nodemesh's policy
  crds           the nodemesh CRDs (AuthorizationPolicy, PeerAuthentication)
  agents         the DaemonSet; per node: the agent's readiness, its version
                 against this client's, and its kernel
  capture        enrolled pods whose capture failed
  unprotected    enrolled pods on nodes without a ready agent
  svids          SVIDs missing, failing or about to expire
  root           the trust bundle's roots and when they expire: the CA's
                 ConfigMap, or the roots each agent got from its SPIFFE
                 Workload API (--identity-source=spiffe-workload-api)
  ca             the CA replicas' health and version (none needed when
                 every agent takes its SVIDs from a SPIFFE Workload API)

Exit status 1 when any check fails; warnings do not fail.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output, "table", "json", "yaml"); err != nil {
				return err
			}
			if g.admin != "" {
				return usagef("check inspects the whole cluster through the API server; drop --admin")
			}
			cl, err := g.cluster()
			if err != nil {
				return err
			}
			ck := &checker{}
			if err := runChecks(cmd.Context(), g, cl, ck); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if output != "table" {
				if err := printValue(w, output, ck.out); err != nil {
					return err
				}
			} else {
				printFindings(w, ck.out)
			}
			if n := ck.failed(); n > 0 {
				if output == "table" {
					fmt.Fprintf(w, "\n%d check(s) failed\n", n)
				}
				return exitError(1)
			}
			if output == "table" {
				fmt.Fprintln(w, "\nall checks passed")
			}
			return nil
		},
	}
	addOutputFlag(c, &output, "table", "json", "yaml")
	return c
}

func printFindings(w io.Writer, fs []finding) {
	for _, f := range fs {
		mark := map[string]string{"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[f.Status]
		where := ""
		if f.Node != "" {
			where = " [" + f.Node + "]"
		}
		fmt.Fprintf(w, "%s  %-11s%s %s\n", mark, f.Check, where, f.Message)
	}
}

// runChecks fills ck. It returns an error only when the API server cannot
// be reached at all.
func runChecks(ctx context.Context, g *globals, cl *cluster.Cluster, ck *checker) error {
	sv, err := cl.Client.Discovery().ServerVersion()
	if err != nil {
		return fmt.Errorf("reaching the API server (context %q): %w", cl.Context, err)
	}
	oldest := utilversion.MustParseGeneric(MinKubernetes)
	if v, err := utilversion.ParseGeneric(sv.GitVersion); err != nil || v.Major() == 0 {
		// A build without version stamping says v0.0.0-master.
		ck.add("kubernetes", "warn", "", "cannot tell the API server's version from %q (a development build?); nodemesh needs %s or later", sv.GitVersion, MinKubernetes)
	} else if v.LessThan(oldest) {
		ck.add("kubernetes", "fail", "", "API server %s is older than %s, the oldest nodemesh supports", sv.GitVersion, MinKubernetes)
	} else {
		ck.add("kubernetes", "ok", "", "API server %s", sv.GitVersion)
	}
	checkAPIs(ctx, cl, ck)
	src := checkAgents(ctx, g, cl, ck)
	checkRoots(ctx, cl, ck, src)
	checkCAs(ctx, cl, ck, src)
	return nil
}

// sourceSPIFFE is the identity source an agent on a SPIFFE Workload API
// reports in /config_dump/identity (agent/node; the CA's is "ca").
const sourceSPIFFE = "spiffe-workload-api"

// identityInfo is an agent's /config_dump/identity.
type identityInfo struct {
	Source     string     `json:"source"`
	Roots      []rootInfo `json:"roots"`
	RootsError string     `json:"rootsError"`
}

type rootInfo struct {
	Subject  string    `json:"subject"`
	NotAfter time.Time `json:"notAfter"`
}

// identitySources is what the agents said about where their SVIDs come
// from: it decides which roots check judges and whether a CA must run.
type identitySources struct {
	// ca counts the agents that take SVIDs from the nodemesh CA.
	ca int
	// spiffe are the agents on a SPIFFE Workload API (SPIRE), with the
	// roots each got from it, by node.
	spiffe map[string]identityInfo
}

// spiffeOnly reports whether the agents that said anything all use a
// SPIFFE Workload API, so the nodemesh CA and its bundle are not used.
func (s identitySources) spiffeOnly() bool { return s.ca == 0 && len(s.spiffe) > 0 }

func checkAPIs(ctx context.Context, cl *cluster.Cluster, ck *checker) {
	if _, err := cl.Client.AdmissionregistrationV1().ValidatingAdmissionPolicies().List(ctx, metav1.ListOptions{Limit: 1}); err != nil {
		ck.add("kubernetes", "fail", "", "ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) is not served: %v", err)
	} else if _, err := cl.Client.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(ctx, "nodemesh-agent-lease", metav1.GetOptions{}); apierrors.IsNotFound(err) {
		ck.add("kubernetes", "warn", "", "ValidatingAdmissionPolicy nodemesh-agent-lease is missing: agents are not confined to their own node's Lease (manifests/base/agent/admission.yaml)")
	} else if err != nil {
		ck.add("kubernetes", "warn", "", "reading ValidatingAdmissionPolicy nodemesh-agent-lease: %v", err)
	} else {
		ck.add("kubernetes", "ok", "", "ValidatingAdmissionPolicy served; nodemesh-agent-lease installed")
	}
	res, err := cl.Client.Discovery().ServerResourcesForGroupVersion("security.nodemesh.io/v1alpha1")
	if err != nil {
		ck.add("crds", "fail", "", "the nodemesh CRDs (security.nodemesh.io/v1alpha1) are not installed: %v (apply manifests/crds)", err)
		return
	}
	var missing []string
	for _, want := range []string{"authorizationpolicies", "peerauthentications"} {
		if !slices.ContainsFunc(res.APIResources, func(r metav1.APIResource) bool { return r.Name == want }) {
			missing = append(missing, want)
		}
	}
	if len(missing) > 0 {
		ck.add("crds", "fail", "", "missing security.nodemesh.io/v1alpha1 %s (apply manifests/crds)", strings.Join(missing, ", "))
		return
	}
	ck.add("crds", "ok", "", "AuthorizationPolicy and PeerAuthentication served")
}

type agentCheck struct {
	st      agentStatus
	capture captureDump
	certs   []certInfo
	rollout rolloutStatus
	ident   identityInfo
	served  [5]bool
}

// checkAgents judges each agent and returns where their SVIDs come from.
func checkAgents(ctx context.Context, g *globals, cl *cluster.Cluster, ck *checker) identitySources {
	src := identitySources{spiffe: map[string]identityInfo{}}
	ds, err := cl.Client.AppsV1().DaemonSets(cl.Namespace).Get(ctx, "nodemesh-agent", metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		ck.add("agents", "warn", "", "no DaemonSet nodemesh-agent in %s (agents not installed by the manifests?)", cl.Namespace)
	case err != nil:
		ck.add("agents", "warn", "", "reading DaemonSet nodemesh-agent: %v", err)
	case ds.Status.NumberReady < ds.Status.DesiredNumberScheduled:
		ck.add("agents", "fail", "", "DaemonSet nodemesh-agent: %d of %d agents ready", ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
	default:
		ck.add("agents", "ok", "", "DaemonSet nodemesh-agent: %d of %d agents ready", ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
	}
	agents, err := g.agents(ctx, "")
	if err != nil {
		ck.add("agents", "fail", "", "%v", err)
		return src
	}
	paths := []string{"/status", "/config_dump/capture", "/config_dump/certificates", "/config_dump/rollout", "/config_dump/identity"}
	rs := ask(ctx, agents, func(ctx context.Context, a agent) (agentCheck, [][]byte, error) {
		var ac agentCheck
		// An agent without a data plane or an API server does not serve
		// some sections.
		raws, err := a.get(ctx, paths, []any{&ac.st, &ac.capture, &ac.certs, &ac.rollout, &ac.ident})
		if err != nil && !errors.Is(err, errNotServed) {
			return ac, nil, err
		}
		for i := range ac.served {
			ac.served[i] = i < len(raws) && raws[i] != nil
		}
		return ac, raws, nil
	})
	client := version.String()
	var unprotected []string
	synced := false
	now := time.Now()
	for _, r := range rs {
		node := r.Agent.Node
		if r.Err != nil {
			ck.add("agents", "fail", node, "agent %s unreachable: %v", r.Agent.Pod, r.Err)
			continue
		}
		a := r.Value
		if !a.served[0] {
			ck.add("agents", "fail", node, "agent %s does not serve /status", r.Agent.Pod)
			continue
		}
		ver := a.st.Info["version"]
		switch {
		case !a.st.Ready:
			ck.add("agents", "fail", node, "agent %s NOT READY: %s", r.Agent.Pod, strings.Join(a.st.failing(), "; "))
		case ver != "" && ver != client && client != "devel" && ver != "devel":
			ck.add("agents", "warn", node, "agent %s ready, version %s differs from this client's %s (see docs/install.md on skew)", r.Agent.Pod, ver, client)
		default:
			ck.add("agents", "ok", node, "agent %s ready, version %s%s", r.Agent.Pod, dash(ver), kernelNote(a.st.Info))
		}
		if a.served[1] {
			var failed []string
			for _, p := range a.capture.Pods {
				if p.Status == "failed" {
					failed = append(failed, p.Pod+": "+p.Problem)
				}
			}
			if len(failed) > 0 {
				ck.add("capture", "fail", node, "capture failed for %d enrolled pod(s): %s", len(failed), strings.Join(failed, "; "))
			} else {
				ck.add("capture", "ok", node, "%d enrolled pod(s) captured", len(a.capture.Pods))
			}
		}
		if a.served[2] {
			bad, soon := 0, 0
			var msgs []string
			for _, c := range a.certs {
				switch {
				case c.Error != "" || c.NotAfter.IsZero() || !c.NotAfter.After(now):
					bad++
					msgs = append(msgs, fmt.Sprintf("%s: %s", c.SPIFFEID, dash(c.Error)))
				case c.NotAfter.Sub(now) < svidWarn:
					soon++
					msgs = append(msgs, fmt.Sprintf("%s expires in %s", c.SPIFFEID, c.NotAfter.Sub(now).Round(time.Second)))
				}
			}
			switch {
			case bad > 0:
				ck.add("svids", "fail", node, "%d of %d SVIDs missing or expired: %s", bad, len(a.certs), strings.Join(msgs, "; "))
			case soon > 0:
				ck.add("svids", "warn", node, "%d of %d SVIDs expire soon (refresh failing?): %s", soon, len(a.certs), strings.Join(msgs, "; "))
			default:
				ck.add("svids", "ok", node, "%d SVIDs valid", len(a.certs))
			}
		}
		if a.served[4] {
			// An agent without a data plane serves no identity section:
			// it holds no SVIDs and needs no source.
			if a.ident.Source == sourceSPIFFE {
				src.spiffe[node] = a.ident
			} else {
				// "ca", or a source this client does not know: the
				// CA's checks apply.
				src.ca++
			}
		}
		if a.served[3] && a.rollout.Synced && !synced {
			synced = true
			unprotected = a.rollout.Unprotected
		}
	}
	switch {
	case !synced:
		ck.add("unprotected", "warn", "", "no agent reported node marks (no API server access?)")
	case len(unprotected) > 0:
		ck.add("unprotected", "fail", "", "%d enrolled pod(s) on nodes without a ready agent (plaintext if PERMISSIVE, refused if STRICT): %s",
			len(unprotected), strings.Join(unprotected, ", "))
	default:
		ck.add("unprotected", "ok", "", "every enrolled pod's node has a ready agent")
	}
	return src
}

func kernelNote(info map[string]string) string {
	if k := info["kernel"]; k != "" {
		return ", kernel " + k
	}
	return ""
}

// checkRoots judges the roots the agents verify peers with: the nodemesh
// CA's bundle ConfigMap when any agent uses the CA (or none said), and the
// roots each SPIFFE Workload API agent reported. A SPIRE-only install has
// no ConfigMap to read, and needs none.
func checkRoots(ctx context.Context, cl *cluster.Cluster, ck *checker, src identitySources) {
	for _, node := range slices.Sorted(maps.Keys(src.spiffe)) {
		id := src.spiffe[node]
		if id.RootsError != "" {
			ck.add("root", "fail", node, "no trust bundle from the SPIFFE Workload API: %s", id.RootsError)
			continue
		}
		judgeSPIFFERoots(ck, node, id.Roots, time.Now())
	}
	if src.spiffeOnly() {
		return
	}
	cm, err := cl.Client.CoreV1().ConfigMaps(cl.Namespace).Get(ctx, identity.BundleConfigMap, metav1.GetOptions{})
	if err != nil {
		ck.add("root", "fail", "", "reading the trust bundle ConfigMap %s/%s: %v", cl.Namespace, identity.BundleConfigMap, err)
		return
	}
	rest := []byte(cm.Data[identity.BundleKey])
	var na []time.Time
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			ck.add("root", "fail", "", "trust bundle %s: a certificate does not parse: %v", identity.BundleConfigMap, err)
			return
		}
		na = append(na, c.NotAfter)
	}
	judgeRoots(ck, "", "in the trust bundle "+identity.BundleConfigMap, na, time.Now())
}

// judgeSPIFFERoots adds the root finding for the roots an agent got from
// its SPIFFE Workload API, judged by the newest: SPIRE's bundle holds the
// current root and, from half its life on, the next, and an old root
// about to expire beside a newer one is SPIRE's normal rotation.
func judgeSPIFFERoots(ck *checker, node string, roots []rootInfo, now time.Time) {
	if len(roots) == 0 {
		ck.add("root", "fail", node, "no root certificates from the SPIFFE Workload API")
		return
	}
	newest := slices.MaxFunc(roots, func(a, b rootInfo) int { return a.NotAfter.Compare(b.NotAfter) }).NotAfter
	switch left := newest.Sub(now); {
	case left <= 0:
		ck.add("root", "fail", node, "every root from the SPIFFE Workload API expired; the newest at %s", newest.UTC().Format(time.RFC3339))
	case left < spiffeRootWarn:
		ck.add("root", "warn", node, "the newest root from the SPIFFE Workload API expires in %s (%s): is the SPIRE server rotating its CA?", left.Round(time.Minute), newest.UTC().Format(time.RFC3339))
	default:
		ck.add("root", "ok", node, "%d root(s) from the SPIFFE Workload API; the newest expires %s (in %s; SPIRE rotates its CA itself)", len(roots), newest.UTC().Format(time.RFC3339), left.Round(time.Minute))
	}
}

// judgeRoots adds the root finding for a bundle whose roots expire at
// notAfter; where says which bundle.
func judgeRoots(ck *checker, node, where string, notAfter []time.Time, now time.Time) {
	if len(notAfter) == 0 {
		ck.add("root", "fail", node, "no root certificates %s", where)
		return
	}
	first := slices.MinFunc(notAfter, func(a, b time.Time) int { return a.Compare(b) })
	switch left := first.Sub(now); {
	case left <= 0:
		ck.add("root", "fail", node, "a root %s expired at %s", where, first.UTC().Format(time.RFC3339))
	case left < rootWarn:
		ck.add("root", "warn", node, "a root %s expires in %s (%s): is rotation working?", where, left.Round(time.Hour), first.UTC().Format(time.RFC3339))
	default:
		ck.add("root", "ok", node, "%d root(s) %s; the first expires %s (in %s)", len(notAfter), where, first.UTC().Format(time.RFC3339), left.Round(time.Hour))
	}
}

// checkCAs judges the CA replicas. None is right when every agent takes
// its SVIDs from a SPIFFE Workload API (SPIRE, the CA scaled to 0), and a
// failure when an agent depends on the CA.
func checkCAs(ctx context.Context, cl *cluster.Cluster, ck *checker, src identitySources) {
	cas, err := cl.CAs(ctx)
	if err != nil {
		ck.add("ca", "fail", "", "%v", err)
		return
	}
	if len(cas) == 0 {
		switch {
		case src.ca > 0:
			ck.add("ca", "fail", "", "no nodemesh-ca pods in %s, but %d agent(s) take their SVIDs from the CA (--identity-source=ca): their SVIDs will expire", cl.Namespace, src.ca)
		case src.spiffeOnly():
			ck.add("ca", "ok", "", "no nodemesh-ca pods in %s: not needed, every agent takes its SVIDs from the SPIFFE Workload API", cl.Namespace)
		default:
			ck.add("ca", "warn", "", "no nodemesh-ca pods in %s (fine only if agents take SVIDs from another SPIFFE source)", cl.Namespace)
		}
		return
	}
	for _, p := range cas {
		if err := askCA(ctx, cl, p.Name, identity.HealthPath, nil); err != nil {
			ck.add("ca", "fail", p.Node, "CA %s unhealthy: %v", p.Name, err)
			continue
		}
		var v struct {
			Version string `json:"version"`
		}
		_ = askCA(ctx, cl, p.Name, identity.VersionPath, &v)
		ck.add("ca", "ok", p.Node, "CA %s healthy, version %s", p.Name, dash(v.Version))
	}
}
