package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// TestLabL7Filters runs the HTTPRoute filters URLRewrite, RequestRedirect
// and RequestMirror through real agents (the routing lab of
// TestLabL7Routing): the application behind a rewrite sees the new Host
// and path, a redirect is answered by the source agent with its Location,
// and a mirrored request reaches the mirror's pod while the client gets
// the primary backend's answer.
func TestLabL7Filters(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	l, dyn, base := routingLab(ctx, t)
	createHTTPRoute(ctx, t, dyn, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-filters, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: web, port: 80}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /rewrite}
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs:
    - {name: web-v1, port: 80}
  - matches:
    - path: {type: PathPrefix, value: /moved}
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.org, statusCode: 301}
  - matches:
    - path: {type: PathPrefix, value: /port}
    filters:
    - type: RequestRedirect
      requestRedirect: {port: 8083, path: {type: ReplaceFullPath, replaceFullPath: /elsewhere}}
  - matches:
    - path: {type: PathPrefix, value: /mirror}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: web-v2, port: 80}}
    backendRefs:
    - {name: web-v1, port: 80}
`)
	one := func(args ...string) workload.Result {
		t.Helper()
		out, err := l.Exec(ctx, "client/client-1", append([]string{"nodemeshctl", "lab", "workload", "requests", "--no-follow"}, args...))
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
		var r workload.Result
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("%v: %q: %v", args, out, err)
		}
		return r
	}
	reply := func(r workload.Result) workload.Reply {
		t.Helper()
		var rep workload.Reply
		if r.Status != 200 || json.Unmarshal([]byte(r.Body), &rep) != nil {
			t.Fatalf("%s: %d %s%s, want the application's 200", r.URL, r.Status, r.Body, r.Error)
		}
		return rep
	}
	waitfor.NoError(t, 90*time.Second, "the route in force (a redirect)", func() error {
		if r := one(base + "/moved/x?q=1"); r.Status != 301 {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})

	// URLRewrite: the application sees the rewritten Host and path, the
	// query kept.
	if rep := reply(one(base + "/rewrite/items?id=7")); rep.Host != "rewritten.example" || rep.Path != "/v2/items?id=7" || rep.Pod != "shop/web-1" {
		t.Errorf("rewrite: the application saw Host %q, URI %q at %s; want rewritten.example, /v2/items?id=7 at shop/web-1", rep.Host, rep.Path, rep.Pod)
	}

	// RequestRedirect, answered by the source agent.
	if r := one(base + "/moved/x?q=1"); r.Status != 301 || r.Location != "https://example.org/moved/x?q=1" {
		t.Errorf("redirect: %d Location %q, want 301 https://example.org/moved/x?q=1", r.Status, r.Location)
	}
	host := strings.TrimSuffix(strings.TrimPrefix(base, "http://"), ":80")
	if r := one(base + "/port/a"); r.Status != 302 || r.Location != "http://"+host+":8083/elsewhere" {
		t.Errorf("redirect: %d Location %q, want 302 http://%s:8083/elsewhere", r.Status, r.Location, host)
	}

	// RequestMirror. Each web pod fails a key the first time it sees it
	// (X-Workload-Fail-Once), so web-2 answering a key with 200 proves it
	// saw it before: through the mirror.
	v2, err := l.Server.Client.CoreV1().Services("shop").Get(ctx, "web-v2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	direct := "http://" + v2.Spec.ClusterIP + ":80/direct" // web-v2 is not opted in: L4 to web-2
	key := func(k string) string { return workload.HeaderFailOnce + "=" + k }
	if r := one("--header", key("never-mirrored"), direct); r.Status != 503 {
		t.Fatalf("control: web-2 answered a new key with %d %s, want its 503", r.Status, r.Body)
	}
	if r := one("--header", key("mirrored"), base+"/mirror/a"); r.Status != 503 {
		t.Errorf("first mirrored request: %d %s, want web-1's 503 for a new key", r.Status, r.Body)
	}
	if rep := reply(one("--header", key("mirrored"), base+"/mirror/b")); rep.Pod != "shop/web-1" {
		t.Errorf("mirrored request answered by %s, want the primary backend shop/web-1 (the mirror's answer is ignored)", rep.Pod)
	}
	// A 503 here would consume the key: give the copies time to arrive,
	// then ask once.
	time.Sleep(time.Second)
	if r := one("--header", key("mirrored"), direct); r.Status != 200 {
		t.Errorf("web-2 answered the mirrored key with %d %s: the mirror did not reach it", r.Status, r.Body)
	}
}
