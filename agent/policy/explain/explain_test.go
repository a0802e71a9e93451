package explain

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

func TestExplainGolden(t *testing.T) {
	cases := []struct {
		name string
		args string
	}{
		{"allow-mtls", "--src shop/frontend --dst shop/backend --port 8080"},
		{"allow-mtls-json", "--src shop/frontend --dst shop/backend --port 8080 -o json"},
		{"deny-ingress-netpol-port", "--src shop/frontend --dst shop/backend --port 9090"},
		{"deny-strict-plaintext", "--src legacy/client --dst shop/backend --port 8080"},
		{"deny-authz-principal", "--src legacy/client --dst shop/backend --port 8080 --principal spiffe://cluster.local/ns/legacy/sa/default"},
		{"deny-egress-by-ip", "--src 10.244.1.5 --dst 203.0.113.10 --port 443"},
		{"allow-kubelet-probe", "--src 192.168.1.10 --dst shop/backend --port 8081"},
		{"allow-to-unmeshed-pod", "--src shop/backend --dst legacy/client --port 80"},
		{"egress-only", "--src shop/frontend --dst shop/backend --port 9090 --direction egress"},
		{"deny-egress-namespaceselector-needs-a-pod", "--src shop/frontend --dst 10.96.0.10 --port 53 --protocol udp --direction egress"},
		{"error-bad-policies", "--from-files testdata/bad --src shop/frontend --dst shop/backend --port 8080"},
		{"warn-refused-policy", "--from-files testdata/refused --src shop/frontend --dst shop/backend --port 8080"},
		{"error-unknown-pod", "--src shop/nope --dst shop/backend --port 8080"},
		{"error-missing-port", "--src shop/frontend --dst shop/backend"},
		// HTTP requests (docs/l7.md): port 8080 of shop/backend is handled
		// at L7, 9090 is not.
		{"request-allow", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --method GET --path /api/items"},
		{"request-deny-method", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --method DELETE --path /api/items"},
		{"request-deny-rule", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --path /api/public/../admin/users"},
		{"request-deny-header-host", "--from-files testdata/l7 --src shop/frontend --dst 10.244.1.6 --port 8080 --path /healthz --host Internal.Example:8080 --header x-debug=1"},
		{"request-allow-header-other", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --path /healthz --host internal.example --header x-debug=0 -o json"},
		{"request-refused-encoded-slash", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --path /api/a%2Fb"},
		{"request-repeated-header", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --path /healthz --header x-debug=0 --header x-debug=1"},
		{"request-port-not-l7", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 9090 --path /api/items"},
		{"request-error-egress", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --path /x --direction egress"},
		{"request-error-bad-path", "--from-files testdata/l7 --src shop/frontend --dst shop/backend --port 8080 --path api"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"explain"}, strings.Fields(tc.args)...)
			if !strings.Contains(tc.args, "--from-files") {
				args = append(args, "--from-files", "testdata/cluster")
			}
			var stdout, stderr bytes.Buffer
			err := Run(context.Background(), args, &stdout, &stderr)
			got := "$ nodemeshctl policy " + strings.Join(args, " ") + "\n" + stdout.String()
			if stderr.Len() > 0 {
				got += "--- stderr\n" + stderr.String()
			}
			if err != nil {
				got += "--- error\n" + err.Error() + "\n"
			}
			path := filepath.Join("testdata", "golden", tc.name+".golden")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("reading golden file (run go test -update to create it): %v", err)
			}
			if got != string(want) {
				t.Errorf("output differs from %s (run go test -update after checking):\n--- got\n%s\n--- want\n%s", path, got, want)
			}
		})
	}
}
