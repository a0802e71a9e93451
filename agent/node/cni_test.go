package node

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/nodemesh/nodemesh/agent/cni"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/agent/workloads"
)

func TestCNISkip(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/a")
	ip := []netip.Addr{netip.MustParseAddr("10.244.1.9")}
	pod := func(f func(p *state.Pod)) *state.Pod {
		p := state.WithDetail(state.Pod{Namespace: "demo", Name: "a", Node: "self", Enrolled: true, Phase: state.PodPending, Identity: id}, state.PodDetail{UID: "u"})
		if f != nil {
			f(p)
		}
		return p
	}
	m := &mesh{filter: workloads.Filter{Node: "self"}}
	only := &mesh{filter: workloads.Filter{Node: "self", Only: map[string]bool{"demo/b": true}}}
	withIPs := cni.Sandbox{Request: cni.Request{IPs: ip}}
	for _, tc := range []struct {
		name    string
		m       *mesh
		p       *state.Pod
		sb      cni.Sandbox
		skip    string // substring; "" = enroll
		wantErr string
	}{
		{"meshed pod, address from the CNI result", m, pod(nil), withIPs, "", ""},
		{"meshed pod, address in the API", m, pod(func(p *state.Pod) { p.IPs = ip }), cni.Sandbox{}, "", ""},
		{"namespace not enrolled", m, pod(func(p *state.Pod) { p.Enrolled = false }), withIPs, "not in the mesh", ""},
		{"host network", m, pod(func(p *state.Pod) { p.HostNetwork = true }), withIPs, "host network", ""},
		{"terminating", m, pod(func(p *state.Pod) { p.Terminating = true }), withIPs, "terminating", ""},
		{"finished", m, pod(func(p *state.Pod) { p.Phase = state.PodSucceeded }), withIPs, "finished", ""},
		{"another agent's pod", only, pod(nil), withIPs, "--only-pod", ""},
		{"another node", m, pod(func(p *state.Pod) { p.Node = "other" }), withIPs, "", `on node "other"`},
		{"no address anywhere", m, pod(nil), cni.Sandbox{}, "", "no pod address"},
		{"no identity", m, pod(func(p *state.Pod) { p.Identity = spiffeid.ID{} }), withIPs, "", "no SPIFFE identity"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			skip, err := tc.m.cniSkip(tc.p, tc.sb)
			switch {
			case tc.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
			case err != nil:
				t.Fatalf("unexpected error %v", err)
			case tc.skip == "" && skip != "":
				t.Fatalf("skipped (%s), want enrolled", skip)
			case !strings.Contains(skip, tc.skip):
				t.Fatalf("skip %q, want %q", skip, tc.skip)
			}
		})
	}
}

// TestNamespaceTable: the CNI plugin's table lists every namespace of the
// state by mode, and keepNamespaceTable writes it once synced and again
// only when a namespace changes.
func TestNamespaceTable(t *testing.T) {
	store, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	path := cni.NamespaceTablePath(filepath.Join(t.TempDir(), "cni.sock"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { keepNamespaceTable(ctx, store, path, slog.New(slog.DiscardHandler)); close(done) }()
	defer func() { cancel(); <-done }()

	set := func(name string, enrolled bool) {
		labels := map[string]string{}
		if enrolled {
			labels[state.LabelMode] = state.ModeEnabled
		}
		store.Update(func(tx *state.Tx) { tx.SetNamespace(&state.Namespace{Name: name, Labels: labels}) })
	}
	set("shop", true)
	set("tools", false)
	time.Sleep(3 * cniTableInterval)
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("table written before the state was synced (err %v)", err)
	}
	store.MarkSynced()
	want := func(meshed, unmeshed string) cni.NamespaceTable {
		t.Helper()
		deadline := time.Now().Add(20 * cniTableInterval)
		for {
			got, err := cni.ReadNamespaceTable(path)
			if err == nil && strings.Join(got.Meshed, ",") == meshed && strings.Join(got.Unmeshed, ",") == unmeshed {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("table %+v (err %v); want meshed %q, unmeshed %q", got, err, meshed, unmeshed)
			}
			time.Sleep(cniTableInterval / 10)
		}
	}
	first := want("shop", "tools")
	set("bank", true)
	want("bank,shop", "tools")
	set("tools", true)
	second := want("bank,shop,tools", "")
	if !second.Written.After(first.Written) {
		t.Errorf("written %v, then %v", first.Written, second.Written)
	}
	// A change that moves no namespace does not rewrite the file.
	st1, _ := os.Stat(path)
	set("tools", true)
	time.Sleep(3 * cniTableInterval)
	if st2, _ := os.Stat(path); !os.SameFile(st1, st2) {
		t.Error("the table was rewritten although no namespace changed mode")
	}
}
