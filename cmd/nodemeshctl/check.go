package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
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
  root           the trust bundle's roots and when they expire
  ca             the CA replicas' health and version

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
	checkAgents(ctx, g, cl, ck)
	checkRoots(ctx, cl, ck)
	checkCAs(ctx, cl, ck)
	return nil
}

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
	served  [4]bool
}

func checkAgents(ctx context.Context, g *globals, cl *cluster.Cluster, ck *checker) {
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
		return
	}
	paths := []string{"/status", "/config_dump/capture", "/config_dump/certificates", "/config_dump/rollout"}
	rs := ask(ctx, agents, func(ctx context.Context, a agent) (agentCheck, [][]byte, error) {
		var ac agentCheck
		// An agent without a data plane or an API server does not serve
		// some sections.
		raws, err := a.get(ctx, paths, []any{&ac.st, &ac.capture, &ac.certs, &ac.rollout})
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
}

func kernelNote(info map[string]string) string {
	if k := info["kernel"]; k != "" {
		return ", kernel " + k
	}
	return ""
}

func checkRoots(ctx context.Context, cl *cluster.Cluster, ck *checker) {
	cm, err := cl.Client.CoreV1().ConfigMaps(cl.Namespace).Get(ctx, identity.BundleConfigMap, metav1.GetOptions{})
	if err != nil {
		ck.add("root", "fail", "", "reading the trust bundle ConfigMap %s/%s: %v", cl.Namespace, identity.BundleConfigMap, err)
		return
	}
	rest := []byte(cm.Data[identity.BundleKey])
	var first time.Time
	n := 0
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
		n++
		if first.IsZero() || c.NotAfter.Before(first) {
			first = c.NotAfter
		}
	}
	left := time.Until(first)
	switch {
	case n == 0:
		ck.add("root", "fail", "", "trust bundle %s has no certificates under %s", identity.BundleConfigMap, identity.BundleKey)
	case left <= 0:
		ck.add("root", "fail", "", "a root in the trust bundle expired at %s", first.UTC().Format(time.RFC3339))
	case left < rootWarn:
		ck.add("root", "warn", "", "a root in the trust bundle expires in %s (%s): is rotation working?", left.Round(time.Hour), first.UTC().Format(time.RFC3339))
	default:
		ck.add("root", "ok", "", "%d root(s); the first expires %s (in %s)", n, first.UTC().Format(time.RFC3339), left.Round(time.Hour))
	}
}

func checkCAs(ctx context.Context, cl *cluster.Cluster, ck *checker) {
	cas, err := cl.CAs(ctx)
	if err != nil {
		ck.add("ca", "fail", "", "%v", err)
		return
	}
	if len(cas) == 0 {
		ck.add("ca", "warn", "", "no nodemesh-ca pods in %s (fine only if agents take SVIDs from another SPIFFE source)", cl.Namespace)
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
