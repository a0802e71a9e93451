package explain

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nodemesh/nodemesh/agent/policy"
)

// TestLiveExplainMatchesOffline serves the test cluster through Handler (as an
// agent's admin API would) and checks that --agent gives the same answers as
// --from-files.
func TestLiveExplainMatchesOffline(t *testing.T) {
	snap, err := LoadDir("testdata/cluster", policy.Options{}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var cur atomic.Pointer[policy.Snapshot]
	_, st, err := loadDir("testdata/cluster", policy.Options{}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(Handler(cur.Load, ClaimedBy(st)))
	defer srv.Close()

	run := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := Run(context.Background(), append([]string{"explain"}, args...), &out, &errOut)
		return out.String(), err
	}
	// No snapshot yet: a clear error, not a guess.
	if _, err := run("--agent", srv.URL, "--src", "shop/frontend", "--dst", "shop/backend", "--port", "8080"); err == nil || !strings.Contains(err.Error(), "no policy snapshot yet") {
		t.Fatalf("before the first snapshot: %v", err)
	}
	cur.Store(snap)

	for _, args := range []string{
		"--src shop/frontend --dst shop/backend --port 8080",
		"--src shop/frontend --dst shop/backend --port 9090 -o json",
		"--src legacy/client --dst shop/backend --port 8080",
		"--src legacy/client --dst shop/backend --port 8080 --principal spiffe://cluster.local/ns/legacy/sa/default",
		"--src 10.244.1.5 --dst 203.0.113.10 --port 443 --direction egress",
		"--src 192.168.1.10 --dst shop/backend --port 8081 --plaintext",
	} {
		live, err := run(append(strings.Fields(args), "--agent", srv.URL+"/")...)
		if err != nil {
			t.Fatalf("%s: live: %v", args, err)
		}
		offline, err := run(append(strings.Fields(args), "--from-files", "testdata/cluster")...)
		if err != nil {
			t.Fatalf("%s: offline: %v", args, err)
		}
		if live != offline {
			t.Errorf("%s: live and offline differ\n--- live\n%s--- offline\n%s", args, live, offline)
		}
	}

	for _, tc := range []struct{ args, want string }{
		{"--src shop/nope --dst shop/backend --port 80", "pod shop/nope not found in the agent's snapshot"},
		{"--src shop/frontend --dst shop/backend --port 80 --from-files testdata/cluster", "either --from-files DIR (offline) or --agent URL"},
	} {
		if _, err := run(append(strings.Fields(tc.args), "--agent", srv.URL)...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
	// Bad requests straight to the handler.
	for _, q := range []string{"?src=a/b&dst=c/d", "?src=a/b&dst=c/d&port=80&protocol=ICMP", "?src=a/b&dst=c/d&port=80&plaintext=maybe"} {
		resp, err := http.Get(srv.URL + Path + q)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", q, resp.StatusCode)
		}
	}
	// HTTP requests: the agent answers with its own view of which ports
	// are handled at L7, the same as offline.
	l7snap, l7st, err := loadDir("testdata/l7", policy.Options{}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	l7srv := httptest.NewServer(Handler(func() *policy.Snapshot { return l7snap }, ClaimedBy(l7st)))
	defer l7srv.Close()
	for _, args := range []string{
		"--src shop/frontend --dst shop/backend --port 8080 --method DELETE --path /api/x",
		"--src shop/frontend --dst shop/backend --port 8080 --path /api/./admin --host Internal.Example --header x-debug=1 -o json",
		"--src shop/frontend --dst shop/backend --port 8080 --path /api/a%2Fb",
		"--src shop/frontend --dst shop/backend --port 9090 --path /api/items --direction ingress",
	} {
		live, err := run(append(strings.Fields(args), "--agent", l7srv.URL)...)
		if err != nil {
			t.Fatalf("%s: live: %v", args, err)
		}
		offline, err := run(append(strings.Fields(args), "--from-files", "testdata/l7")...)
		if err != nil {
			t.Fatalf("%s: offline: %v", args, err)
		}
		if live != offline {
			t.Errorf("%s: live and offline differ\n--- live\n%s--- offline\n%s", args, live, offline)
		}
	}
	// Without the agent's L7 view, nothing is handled at L7.
	nol7 := httptest.NewServer(Handler(func() *policy.Snapshot { return l7snap }, nil))
	defer nol7.Close()
	if out, err := run("--agent", nol7.URL, "--src", "shop/frontend", "--dst", "shop/backend", "--port", "8080", "--path", "/api/x"); err != nil || !strings.Contains(out, "not handled at L7") {
		t.Errorf("no L7 view: %v\n%s", err, out)
	}

	resp, err := http.Post(srv.URL+Path, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: status %d, want 405", resp.StatusCode)
	}
}
