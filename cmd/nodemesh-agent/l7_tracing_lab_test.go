package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/agent/l7"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/labtest"
	"github.com/nodemesh/nodemesh/lab/mesh"
	"github.com/nodemesh/nodemesh/lab/waitfor"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// otlpSpan is one span the test's OTLP receiver got, with the node named
// in its resource.
type otlpSpan struct {
	node                string
	traceID, id, parent string
	kind                tracepb.Span_SpanKind
	attrs               map[string]string
}

// otlpReceiver is an OTLP/HTTP trace receiver (POST /v1/traces, protobuf).
type otlpReceiver struct {
	mu    sync.Mutex
	spans []otlpSpan
}

func (rc *otlpReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" {
		http.Error(w, "want POST /v1/traces", http.StatusNotFound)
		return
	}
	var body io.Reader = r.Body
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = zr
	}
	b, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var req coltracepb.ExportTraceServiceRequest
	if err := proto.Unmarshal(b, &req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rc.mu.Lock()
	for _, rs := range req.ResourceSpans {
		node := ""
		for _, kv := range rs.GetResource().GetAttributes() {
			if kv.Key == "k8s.node.name" {
				node = kv.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.ScopeSpans {
			for _, sp := range ss.Spans {
				attrs := map[string]string{}
				for _, kv := range sp.Attributes {
					v := kv.GetValue()
					if sv, ok := v.GetValue().(*commonpb.AnyValue_StringValue); ok {
						attrs[kv.Key] = sv.StringValue
					} else {
						attrs[kv.Key] = fmt.Sprint(v.GetIntValue())
					}
				}
				rc.spans = append(rc.spans, otlpSpan{node: node, traceID: hex.EncodeToString(sp.TraceId), id: hex.EncodeToString(sp.SpanId),
					parent: hex.EncodeToString(sp.ParentSpanId), kind: sp.Kind, attrs: attrs})
			}
		}
	}
	rc.mu.Unlock()
	b, _ = proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(b)
}

func (rc *otlpReceiver) trace(id string) []otlpSpan {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var out []otlpSpan
	for _, s := range rc.spans {
		if s.traceID == id {
			out = append(out, s)
		}
	}
	return out
}

// TestLabL7Tracing checks tracing through real agents: a client pod on
// node-2 sends a request with a sampled W3C traceparent to an opted-in
// Service whose only pod is on node-1. The OTLP receiver in this test
// (listening in node-1's network namespace) gets a CLIENT span from
// node-2's agent, the child of the client's span, and a SERVER span from
// node-1's agent, the child of the CLIENT span; the application receives
// the SERVER span as its parent. The agents sample with the default 1%, so
// a request without a sampled parent is (almost surely) not recorded.
func TestLabL7Tracing(t *testing.T) {
	l := labtest.TwoNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	agentBin := labtest.GoBuild(t, "./cmd/nodemesh-agent")
	caBin := labtest.GoBuild(t, "./cmd/nodemesh-ca")
	for _, ns := range []string{"shop", "client"} {
		setMode(t, ctx, l, ns, state.ModeEnabled)
	}
	web1 := mustLabPod(t, l, "shop/web-1")
	podService(ctx, t, l, "web-v1", web1)
	c := l.Server.Client
	s, err := c.CoreV1().Services("shop").Get(ctx, "web-v1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Labels = map[string]string{l7.LabelL7: l7.ValueEnabled}
	if _, err := c.CoreV1().Services("shop").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	node1, err := l.Node("node-1")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := inpod.ListenTCP(ctx, node1.Netns, "tcp4", node1.IP+":4318")
	if err != nil {
		t.Fatal(err)
	}
	rc := &otlpReceiver{}
	srv := &http.Server{Handler: rc, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()

	m, err := mesh.Start(ctx, l, mesh.Options{AgentBinary: agentBin, CABinary: caBin, LogLevel: "debug",
		DrainDeadline: 5 * time.Second, CRDRecheck: time.Second, Wait: 3 * time.Minute,
		AgentArgs: []string{"--otlp-endpoint", "http://" + node1.IP + ":4318"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Stop(context.Background())
		for _, a := range m.Agents {
			dumpLog(t, a.Log)
		}
	})
	// The lab knows only its spec's Services; web-v1 is the test's.
	svc, err := c.CoreV1().Services("shop").Get(ctx, "web-v1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://%s:80/traced", svc.Spec.ClusterIP)
	const clientSpan = "00f067aa0ba902b7"
	send := func(traceID, flags string) workload.Reply {
		t.Helper()
		out, err := l.Exec(ctx, "client/client-2", []string{"nodemeshctl", "lab", "workload", "requests",
			"--header", "traceparent=00-" + traceID + "-" + clientSpan + "-" + flags, url})
		if err != nil {
			t.Fatalf("request: %v: %s", err, out)
		}
		var r workload.Result
		var reply workload.Reply
		if json.Unmarshal(bytes.TrimSpace(out), &r) != nil || r.Status != 200 || json.Unmarshal([]byte(r.Body), &reply) != nil {
			t.Fatalf("request answered %s", out)
		}
		return reply
	}
	// The Service is handled at L7 once the source agent's state has it.
	waitfor.NoError(t, 90*time.Second, "a traced request", func() error {
		out, err := l.Exec(ctx, "client/client-2", []string{"nodemeshctl", "lab", "workload", "requests", url})
		if err != nil || !strings.Contains(string(out), `"status":200`) {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	// A parent that is not sampled is not recorded (parent-based
	// sampling); it is sent first, so its spans, if any, would be exported
	// before the sampled trace's.
	unsampled := "5bf92f3577b34da6a3ce929d0e0e4736"
	send(unsampled, "00")
	traceID := "4bf92f3577b34da6a3ce929d0e0e4736"
	reply := send(traceID, "01")
	var spans []otlpSpan
	waitfor.NoError(t, 30*time.Second, "both agents' spans at the OTLP receiver", func() error {
		spans = rc.trace(traceID)
		if len(spans) < 2 {
			return fmt.Errorf("%d spans of trace %s so far", len(spans), traceID)
		}
		return nil
	})
	var client, server *otlpSpan
	for i := range spans {
		switch spans[i].kind {
		case tracepb.Span_SPAN_KIND_CLIENT:
			client = &spans[i]
		case tracepb.Span_SPAN_KIND_SERVER:
			server = &spans[i]
		}
	}
	if client == nil || server == nil || len(spans) != 2 {
		t.Fatalf("spans of the trace: %+v; want one CLIENT and one SERVER", spans)
	}
	t.Logf("CLIENT span %s from %s (parent %s), SERVER span %s from %s (parent %s)", client.id, client.node, client.parent, server.id, server.node, server.parent)
	if client.node != "node-2" || server.node != "node-1" {
		t.Errorf("CLIENT span from %q, SERVER span from %q; want node-2's and node-1's agents", client.node, server.node)
	}
	if client.parent != clientSpan || server.parent != client.id {
		t.Errorf("parents: CLIENT %s (want the client's %s), SERVER %s (want the CLIENT span %s)", client.parent, clientSpan, server.parent, client.id)
	}
	if client.attrs["http.response.status_code"] != "200" || server.attrs["url.path"] != "/traced" {
		t.Errorf("span attributes: CLIENT %v, SERVER %v", client.attrs, server.attrs)
	}
	if got, want := reply.Header.Get("Traceparent"), "00-"+traceID+"-"+server.id+"-01"; got != want {
		t.Errorf("the application got traceparent %q, want %q (the SERVER span as its parent)", got, want)
	}
	if n := len(rc.trace(unsampled)); n != 0 {
		t.Errorf("%d spans recorded for a request whose traceparent is not sampled", n)
	}
}
