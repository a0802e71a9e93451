package cluster_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/lab/workload"
)

// newStrictPods creates HTTP server pods in demo (STRICT since proveMesh)
// on each node while the outsider (namespace plain, not enrolled) sends
// plaintext requests to each new pod's address from the moment the API
// has it until well after its capture is verified. None may be answered
// by the pod's application: the nodemesh CNI plugin has the pod captured
// before its container starts, so every such connection is refused by the
// agent (STRICT) or, before the application listens, by the pod's stack.
// It also measures each pod's Ready → capture verified.
func (in *installed) newStrictPods(t *testing.T, ctx context.Context) {
	c := in.c
	client := c.Server.Client
	outsider, err := client.CoreV1().Pods("plain").Get(ctx, "outsider", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dialer := &inpod.Dialer{Netns: podNetns(t, outsider, "nodemeshctl")}
	var strictBefore float64
	for _, n := range c.Nodes {
		if m, err := metrics(ctx, n); err == nil {
			strictBefore += metricValue(m, "nodemesh_connections_denied_total", `reason="strict_mtls"`)
		}
	}
	type result struct {
		pod, node        string
		attempts, leaks  int
		outcomes         map[string]int
		firstLeak        string
		readyToVerified  time.Duration
		ipSeenToVerified time.Duration
	}
	var results []result
	for i, n := range c.Nodes {
		name := fmt.Sprintf("strict-new-%d", i)
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: demoNS, Labels: map[string]string{"app": "strict-new"}},
			Spec: corev1.PodSpec{
				NodeName:                      n.Name,
				ServiceAccountName:            "server",
				AutomountServiceAccountToken:  ptr.To(false),
				EnableServiceLinks:            ptr.To(false),
				TerminationGracePeriodSeconds: ptr.To[int64](1),
				Containers: []corev1.Container{{
					Name: "http", Image: "localhost/nodemesh-workload:dev", ImagePullPolicy: corev1.PullNever,
					Args:  []string{"http", "--port", "8080"},
					Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
					ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8080)}},
						PeriodSeconds: 1, FailureThreshold: 2},
				}},
			},
		}
		if _, err := client.CoreV1().Pods(demoNS).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating %s: %v", name, err)
		}
		r := result{pod: name, node: n.Name, outcomes: map[string]int{}}
		// The pod's address, as soon as the API has it.
		var ip string
		var ipSeen time.Time
		if err := poll(ctx, 2*time.Minute, func() (bool, string) {
			q, err := client.CoreV1().Pods(demoNS).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			ip = q.Status.PodIP
			return ip != "", name + " has no IP yet"
		}); err != nil {
			t.Fatal(err)
		}
		ipSeen = time.Now()
		target := net.JoinHostPort(ip, "8080")
		// Plaintext from outside the mesh, one connection after another,
		// while the metrics are watched for the pod's verified capture.
		var (
			mu       sync.Mutex
			verified time.Time
			wg       sync.WaitGroup
		)
		hctx, stop := context.WithCancel(ctx)
		wg.Go(func() {
			for hctx.Err() == nil {
				kind, detail := plaintextAttempt(hctx, dialer, target)
				mu.Lock()
				r.attempts++
				r.outcomes[kind]++
				if kind == "answered" {
					r.leaks++
					if r.firstLeak == "" {
						r.firstLeak = detail
					}
				}
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		})
		err := poll(ctx, time.Minute, func() (bool, string) {
			m, err := metrics(ctx, n)
			if err != nil {
				return false, err.Error()
			}
			if metricValue(m, "nodemesh_capture_status", `namespace="`+demoNS+`"`, `pod="`+name+`"`, `status="verified"`) == 1 {
				mu.Lock()
				verified = time.Now()
				mu.Unlock()
				return true, ""
			}
			return false, "capture of " + name + " not verified on " + n.Name
		})
		if err != nil {
			t.Error(err)
		}
		// Keep sending until the pod is Ready and a while longer: the
		// application answers by now, but only the agent may see the
		// plaintext.
		var ready time.Time
		if err := poll(ctx, time.Minute, func() (bool, string) {
			q, err := client.CoreV1().Pods(demoNS).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			ready = readyAt(q)
			return !ready.IsZero(), name + " not Ready"
		}); err != nil {
			t.Error(err)
		}
		time.Sleep(3 * time.Second)
		stop()
		wg.Wait()
		if !verified.IsZero() && !ready.IsZero() {
			r.readyToVerified = verified.Sub(ready)
			r.ipSeenToVerified = verified.Sub(ipSeen)
		}
		results = append(results, r)
		if err := client.CoreV1().Pods(demoNS).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Errorf("deleting %s: %v", name, err)
		}
	}
	var strictAfter float64
	for _, n := range c.Nodes {
		if m, err := metrics(ctx, n); err == nil {
			strictAfter += metricValue(m, "nodemesh_connections_denied_total", `reason="strict_mtls"`)
		}
	}
	for _, r := range results {
		var kinds []string
		for k, v := range r.outcomes {
			kinds = append(kinds, fmt.Sprintf("%s %d", k, v))
		}
		sort.Strings(kinds)
		t.Logf("new STRICT pod %s on %s: %d plaintext connections from plain/outsider from the moment its IP was in the API (%s); Ready → verified %s (IP in the API → verified %s)",
			r.pod, r.node, r.attempts, strings.Join(kinds, ", "), r.readyToVerified.Round(time.Millisecond), r.ipSeenToVerified.Round(time.Millisecond))
		if r.leaks > 0 {
			t.Errorf("new STRICT pod %s: %d plaintext connections from outside the mesh were answered by its application, first: %s", r.pod, r.leaks, r.firstLeak)
		}
		if r.attempts == 0 {
			t.Errorf("new STRICT pod %s: no plaintext connection was tried", r.pod)
		}
	}
	if strictAfter <= strictBefore {
		t.Errorf("the agents counted no STRICT denial of the outsider's plaintext (%v before, %v after)", strictBefore, strictAfter)
	} else {
		t.Logf("the agents denied %v plaintext connections by STRICT meanwhile", strictAfter-strictBefore)
	}
}

// plaintextAttempt makes one plaintext HTTP request to target and says how
// it ended: "answered" when the application replied (the leak), else how it
// was refused.
func plaintextAttempt(ctx context.Context, d *inpod.Dialer, target string) (string, string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return refusal("connect", err), ""
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "GET /new-pod HTTP/1.1\r\nHost: "+target+"\r\nConnection: close\r\n\r\n"); err != nil {
		return refusal("send", err), ""
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return refusal("answer", err), ""
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var r workload.Reply
	if json.Unmarshal(body, &r) == nil && r.Pod != "" {
		return "answered", fmt.Sprintf("%s answered %s: %s", r.Pod, resp.Status, strings.TrimSpace(string(body)))
	}
	return "answered", fmt.Sprintf("%s: %s %q", target, resp.Status, body)
}

func refusal(what string, err error) string {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return what + " refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return what + " reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return what + " closed"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return what + " timed out"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return what + " unreachable"
	}
	return what + " failed"
}
