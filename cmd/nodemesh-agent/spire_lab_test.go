package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/policy/v1alpha1"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/lab"
	"github.com/nodemesh/nodemesh/lab/demo"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/privtest"
	"github.com/nodemesh/nodemesh/lab/spire"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
	"github.com/nodemesh/nodemesh/manifests"
)

// TestLabSpireIdentitySource runs the agents with
// --identity-source=spiffe-workload-api against a real SPIRE (lab/spire:
// spire-server and one spire-agent per node, v1.13.3 built by `make
// spire`), with per-node registration entries as docs/install.md describes
// them: one per identity of the node's pods, parented to the node's SPIRE
// agent, selecting only the nodemesh agent binary (unix:uid, unix:path).
// Under STRICT mTLS in both namespaces it checks traffic across nodes, that
// the SVIDs presented and logged are SPIRE's (signed by SPIRE's root, not
// the nodemesh CA's), that no other process of the node gets them, that
// `nodemeshctl check` passes with the nodemesh CA scaled to 0 and its
// bundle gone, and that a pod whose identity has no entry under its node
// fails closed in both directions, and recovers once the entry is back.
func TestLabSpireIdentitySource(t *testing.T) {
	spireDir, err := spire.BinDir()
	if err != nil {
		privtest.Skip(t, err.Error())
	}
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	ctlBin := labtest.GoBuild(t, "./cmd/nodemeshctl")
	td := spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain)

	start := time.Now()
	sp, err := spire.Start(ctx, l, spire.Options{BinDir: spireDir, TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("SPIRE %s: server on %s (%s) and %d agents healthy in %s", spire.Version, sp.ServerNode, sp.ServerAddr, len(sp.Agents), time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		dumpLog(t, sp.ServerLog)
		for _, a := range sp.Agents {
			dumpLog(t, a.Log)
		}
		if err := sp.Stop(context.Background()); err != nil {
			t.Errorf("stopping SPIRE: %v", err)
		}
	})

	// Per-node entries: every identity a node's pods run as, under that
	// node's SPIRE agent, for the nodemesh agent binary only.
	sel, err := spire.ProcessSelectors(agentBin)
	if err != nil {
		t.Fatal(err)
	}
	type nodeID struct {
		node string
		id   spiffeid.ID
	}
	entries := map[nodeID]string{}
	wantIDs := map[string][]string{} // node -> identities, sorted
	for _, p := range l.Pods() {
		id, err := identity.WorkloadID(td, p.Namespace, p.ServiceAccount)
		if err != nil {
			t.Fatal(err)
		}
		k := nodeID{p.Node, id}
		if _, ok := entries[k]; ok {
			continue
		}
		if entries[k], err = sp.CreateEntry(ctx, spire.Entry{Node: p.Node, SPIFFEID: id, Selectors: sel}); err != nil {
			t.Fatal(err)
		}
		wantIDs[p.Node] = append(wantIDs[p.Node], id.String())
	}
	for _, ids := range wantIDs {
		slices.Sort(ids)
	}
	t.Logf("registration entries (selectors %v): %v", sel, wantIDs)

	// STRICT in both namespaces (the CRDs first, as an install has them).
	dyn, err := dynamic.NewForConfig(l.Server.REST)
	if err != nil {
		t.Fatal(err)
	}
	crds, err := manifests.Render("../../manifests/crds")
	if err != nil {
		t.Fatal(err)
	}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, crd := range crds {
		if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{"shop", "client"} {
		pa := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "security.nodemesh.io/v1alpha1", "kind": "PeerAuthentication",
			"metadata": map[string]any{"name": "strict", "namespace": ns},
			"spec":     map[string]any{"mtls": map[string]any{"mode": "STRICT"}},
		}}
		waitfor.NoError(t, 60*time.Second, "PeerAuthentication STRICT in "+ns, func() error {
			_, err := dyn.Resource(v1alpha1.PeerAuthenticationResource).Namespace(ns).Create(ctx, pa, metav1.CreateOptions{})
			return err
		})
		setMode(t, ctx, l, ns, state.ModeEnabled)
	}

	byNode := map[string][]string{}
	for node, a := range sp.Agents {
		byNode[node] = []string{"--identity-source=spiffe-workload-api", "--spiffe-endpoint-socket", a.Addr()}
	}
	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin, AgentArgsByNode: byNode, Wait: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Stop(context.Background())
		for _, a := range m.Agents {
			dumpLog(t, a.Log)
		}
	})

	client1, client2 := mustLabPod(t, l, "client/client-1"), mustLabPod(t, l, "client/client-2")
	web1, web2 := mustLabPod(t, l, "shop/web-1"), mustLabPod(t, l, "shop/web-2")
	get := func(from, url string) (workload.Reply, error) {
		r, out, err := demo.Get(ctx, l, from, url)
		if err != nil {
			return r, fmt.Errorf("%w: %s", err, out)
		}
		return r, nil
	}
	clientID := "spiffe://cluster.local/ns/client/sa/client"
	webID := "spiffe://cluster.local/ns/shop/sa/web"

	t.Run("AcrossNodesUnderSTRICT", func(t *testing.T) {
		r, err := get(client1.Key(), "http://"+web2.IP+":8080/spire")
		if err != nil {
			t.Fatal(err)
		}
		if err := deliveredFrom(r, web2, client1.IP); err != nil {
			t.Fatal(err)
		}
		// STRICT is in force: plaintext from outside the mesh (this test
		// process in client-1's network namespace, not in its cgroup, so
		// not captured) is refused at web-2's agent.
		if err := plaintextGet(ctx, client1, web2.IP+":8080"); err == nil {
			t.Fatal("plaintext to web-2 passed STRICT")
		}
		waitfor.NoError(t, 20*time.Second, "STRICT refusal counted on node-2", func() error {
			b, err := m.Metrics(ctx, "node-2")
			if err != nil {
				return err
			}
			if !strings.Contains(string(b), `nodemesh_connections_denied_total{direction="inbound",reason="strict_mtls"}`) {
				return fmt.Errorf("no strict_mtls refusal in:\n%s", grep(string(b), "denied"))
			}
			return nil
		})
		// The destination's access log names both SPIRE-issued identities.
		waitfor.NoError(t, 20*time.Second, "access log on node-2", func() error {
			recs, err := m.AccessLog("node-2")
			if err != nil {
				return err
			}
			for _, rec := range recs {
				if rec.Msg == "connection" && rec.Reporter == "destination" && rec.SrcSPIFFEID == clientID &&
					rec.DstSPIFFEID == webID && rec.Security == "mutual_tls" && rec.BytesSent > 0 {
					t.Logf("access log: %s", rec.Line)
					return nil
				}
			}
			return fmt.Errorf("no mutual_tls record from %s to %s among %d", clientID, webID, len(recs))
		})
	})

	t.Run("SVIDsAreSPIREs", func(t *testing.T) {
		roots, err := sp.Bundle(ctx)
		if err != nil {
			t.Fatal(err)
		}
		spireKeys := map[string]bool{}
		for _, c := range roots {
			spireKeys[hex.EncodeToString(c.SubjectKeyId)] = true
		}
		caKeys := nodemeshCARootKeys(t, ctx, l)
		for k := range caKeys {
			if spireKeys[k] {
				t.Fatalf("the nodemesh CA and SPIRE share root key %s", k)
			}
		}
		for _, node := range []string{"node-1", "node-2"} {
			var certs []struct {
				SPIFFEID       string    `json:"spiffeId"`
				NotAfter       time.Time `json:"notAfter"`
				Issuer         string    `json:"issuer"`
				AuthorityKeyID string    `json:"authorityKeyId"`
				Error          string    `json:"error"`
			}
			getJSON(t, ctx, m, node, "/config_dump/certificates", &certs)
			var got []string
			for _, c := range certs {
				got = append(got, c.SPIFFEID)
				switch {
				case c.Error != "":
					t.Errorf("%s: SVID %s: %s", node, c.SPIFFEID, c.Error)
				case caKeys[c.AuthorityKeyID]:
					t.Errorf("%s: SVID %s is signed by the nodemesh CA (%s), not SPIRE", node, c.SPIFFEID, c.Issuer)
				case !spireKeys[c.AuthorityKeyID]:
					t.Errorf("%s: SVID %s is signed by %s (key %s), not by SPIRE's root", node, c.SPIFFEID, c.Issuer, c.AuthorityKeyID)
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, wantIDs[node]) {
				t.Errorf("%s presents SVIDs for %v, want %v", node, got, wantIDs[node])
			}
			var id struct {
				Source   string   `json:"source"`
				Endpoint string   `json:"endpoint"`
				Provided []string `json:"provided"`
				Roots    []struct {
					SubjectKeyID string `json:"subjectKeyId"`
				} `json:"roots"`
			}
			getJSON(t, ctx, m, node, "/config_dump/identity", &id)
			if id.Source != "spiffe-workload-api" || id.Endpoint != sp.Agents[node].Addr() || !slices.Equal(id.Provided, wantIDs[node]) {
				t.Errorf("%s /config_dump/identity: %+v, want SPIRE at %s providing %v", node, id, sp.Agents[node].Addr(), wantIDs[node])
			}
			if len(id.Roots) == 0 || !spireKeys[id.Roots[0].SubjectKeyID] {
				t.Errorf("%s verifies peers with roots %+v, not SPIRE's", node, id.Roots)
			}
			if len(certs) > 0 {
				t.Logf("%s: %d SVIDs from SPIRE, issuer %q", node, len(certs), certs[0].Issuer)
			}
		}
		// Only the nodemesh agent gets them: another root process of the
		// node (spire-agent's own CLI) asks the same socket and gets no
		// identity.
		if out, err := sp.FetchX509(ctx, "node-1"); err == nil {
			t.Errorf("a process other than the nodemesh agent got SVIDs from node-1's SPIRE agent:\n%s", out)
		} else {
			t.Logf("another process on node-1 asking SPIRE: %v", err)
		}
	})

	t.Run("CheckWithCAScaledToZero", func(t *testing.T) {
		// A SPIRE install: no CA pod and no CA bundle ConfigMap.
		if err := m.StopCA(ctx); err != nil {
			t.Fatal(err)
		}
		c := l.Server.Client.CoreV1()
		if err := c.Pods(mesh.SystemNamespace).Delete(ctx, "nodemesh-ca-"+m.CANode, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := c.ConfigMaps(mesh.SystemNamespace).Delete(ctx, identity.BundleConfigMap, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
		cmd := exec.CommandContext(ctx, ctlBin, "check", "-o", "json", "--kubeconfig", l.Kubeconfig())
		cmd.Env = append(os.Environ(), "NODEMESH_ADMIN=")
		out, err := cmd.Output()
		var fs []struct {
			Check, Status, Node, Message string
		}
		if jerr := json.Unmarshal(out, &fs); jerr != nil {
			t.Fatalf("nodemeshctl check -o json: %v (%v)\n%s", jerr, err, out)
		}
		status := map[string]string{}
		for _, f := range fs {
			if k := f.Check + "/" + f.Node; status[k] != "fail" {
				status[k] = f.Status
			}
			t.Logf("check: %s %s %s: %s", f.Status, f.Check, f.Node, f.Message)
		}
		// The lab has no DaemonSet or admission policy (warnings); what
		// the identity source decides must pass.
		for _, k := range []string{"agents/node-1", "agents/node-2", "svids/node-1", "svids/node-2", "root/node-1", "root/node-2", "ca/"} {
			if status[k] != "ok" {
				t.Errorf("check %s: %q, want ok", k, status[k])
			}
		}
		if s, ok := status["root/"]; ok {
			t.Errorf("check judged the CA's bundle ConfigMap (%s) on a SPIRE-only install", s)
		}
	})

	t.Run("NoEntryFailsClosed", func(t *testing.T) {
		// client-2's identity loses its entry under node-2. The entry for
		// the same identity under node-1 stays: it does not serve node-2.
		k := nodeID{"node-2", spiffeid.RequireFromString(clientID)}
		deleted := time.Now()
		if err := sp.DeleteEntry(ctx, entries[k]); err != nil {
			t.Fatal(err)
		}
		provided := func(node string) []string {
			var id struct {
				Provided []string `json:"provided"`
			}
			getJSON(t, ctx, m, node, "/config_dump/identity", &id)
			return id.Provided
		}
		waitfor.True(t, 60*time.Second, "node-2's agent to lose the SVID of "+clientID, func() bool {
			return !slices.Contains(provided("node-2"), clientID)
		})
		t.Logf("node-2's agent dropped %s %s after its entry was deleted", clientID, time.Since(deleted).Round(time.Millisecond))
		if !slices.Contains(provided("node-1"), clientID) {
			t.Fatalf("node-1 lost %s too", clientID)
		}
		n2, _ := l.Node("node-2")
		if code, body, err := httpGet(nodeClient(n2), mesh.ReadyURL); err != nil || code == http.StatusOK || !strings.Contains(body, clientID) {
			t.Errorf("node-2's readiness does not name the missing SVID: %d %q %v", code, body, err)
		}
		// Both directions fail, nothing falls back to plaintext; other
		// identities on the node are untouched.
		if r, err := get("shop/web-1", "http://"+client2.IP+":8080/no-entry"); err == nil {
			t.Errorf("web-1 reached client-2, whose identity has no entry under node-2: %+v", r)
		}
		if r, err := get("client/client-2", "http://"+web1.IP+":8080/no-entry"); err == nil {
			t.Errorf("client-2, whose identity has no entry under node-2, reached web-1: %+v", r)
		}
		if _, err := get(client1.Key(), "http://"+web2.IP+":8080/other-identity"); err != nil {
			t.Errorf("web-2 (its entry kept) stopped working: %v", err)
		}
		// The entry back: traffic resumes without a restart.
		var err error
		if entries[k], err = sp.CreateEntry(ctx, spire.Entry{Node: "node-2", SPIFFEID: k.id, Selectors: sel}); err != nil {
			t.Fatal(err)
		}
		begin := time.Now()
		waitfor.NoError(t, 60*time.Second, "web-1 to client-2 after the entry is back", func() error {
			_, err := get("shop/web-1", "http://"+client2.IP+":8080/entry-back")
			return err
		})
		t.Logf("client-2 reachable %s after its entry was created again", time.Since(begin).Round(time.Millisecond))
	})
}

// plaintextGet sends one HTTP request from this process inside pod's
// network namespace (outside its cgroup: not captured, so not mesh
// traffic) and fails unless an HTTP response comes back.
func plaintextGet(ctx context.Context, pod lab.Pod, addr string) error {
	c, err := (&inpod.Dialer{Netns: pod.Netns}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /plaintext HTTP/1.0\r\nHost: "+addr+"\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return err
	}
	return resp.Body.Close()
}

// getJSON decodes one of node's agent admin sections into v.
func getJSON(t *testing.T, ctx context.Context, m *mesh.Mesh, node, path string, v any) {
	t.Helper()
	b, err := m.Get(ctx, node, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s %s: %v\n%s", node, path, err, b)
	}
}

// nodemeshCARootKeys returns the subject key IDs (hex) of the nodemesh CA's
// roots, from the bundle ConfigMap it publishes.
func nodemeshCARootKeys(t *testing.T, ctx context.Context, l *lab.Lab) map[string]bool {
	t.Helper()
	keys := map[string]bool{}
	waitfor.NoError(t, 30*time.Second, "the nodemesh CA's bundle", func() error {
		cm, err := l.Server.Client.CoreV1().ConfigMaps(mesh.SystemNamespace).Get(ctx, identity.BundleConfigMap, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for rest := []byte(cm.Data[identity.BundleKey]); ; {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return err
			}
			keys[hex.EncodeToString(c.SubjectKeyId)] = true
		}
		if len(keys) == 0 {
			return fmt.Errorf("no roots in %s", identity.BundleConfigMap)
		}
		return nil
	})
	return keys
}
