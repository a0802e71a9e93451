package bench

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

func TestScaleProfileByName(t *testing.T) {
	p, err := ScaleProfileByName("scale")
	if err != nil || !slices.Equal(p.Points, []int{1000, 10000, 100000}) {
		t.Fatalf("scale: %v %v", p.Points, err)
	}
	p, err = ScaleProfileByName("scale:10k, 1k,1k,2500")
	if err != nil || !slices.Equal(p.Points, []int{1000, 2500, 10000}) || p.ChurnRate != ScaleProfiles["scale"].ChurnRate {
		t.Fatalf("scale with points: %+v %v", p, err)
	}
	for _, bad := range []string{"scale:", "scale:0", "scale:x", "scale:2m", "huge", "scale-smoke:-1"} {
		if _, err := ScaleProfileByName(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	if !IsScaleProfile("scale:1k") || !IsScaleProfile("scale-smoke") || IsScaleProfile("quick") {
		t.Error("IsScaleProfile")
	}
}

// The synthetic cluster at 100,000 pods has the sizes of issue 18, and a
// larger point only adds objects to a smaller one.
func TestSynthShape(t *testing.T) {
	got := synthFor(100000)
	want := synth{Pods: 100000, Nodes: 5000, Namespaces: 1000, NetworkPolicies: 10000, AuthorizationPolicies: 1000, Services: 5000}
	if got != want {
		t.Fatalf("synthFor(100000) = %+v, want %+v", got, want)
	}
	if s := synthFor(150); s.Namespaces != 2 || s.Nodes != 8 {
		t.Errorf("synthFor(150) = %+v", s)
	}
	if simPodKey(99) != "sim-00000/p-0000099" || simPodKey(100) != "sim-00001/p-0000100" {
		t.Errorf("pod keys %s %s", simPodKey(99), simPodKey(100))
	}
	seen := map[string]bool{}
	for i := range 70000 {
		ip := simPodIP(i)
		if seen[ip] || !strings.HasPrefix(ip, "100.") {
			t.Fatalf("pod %d: address %s repeated or outside 100.64.0.0/10", i, ip)
		}
		seen[ip] = true
	}
	if simPodIP(0) != "100.64.0.1" || simNodeIP(4999) != "172.16.19.136" {
		t.Errorf("addresses %s %s", simPodIP(0), simNodeIP(4999))
	}
}

func TestLatencyOf(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	l := latencyOf(ds, 2)
	if l.N != 100 || l.P50 != 51*time.Millisecond || l.P99 != 100*time.Millisecond || l.Max != 100*time.Millisecond || l.Timeouts != 2 {
		t.Errorf("%+v", l)
	}
	if l := latencyOf(nil, 1); l.N != 0 || l.P99 != 0 || l.Timeouts != 1 {
		t.Errorf("empty: %+v", l)
	}
}

func TestScaleMarkdownWithoutPoints(t *testing.T) {
	res := &ScaleResults{Profile: ScaleProfiles["scale-smoke"], Points: []ScaleSize{{Pods: 200, Error: "boom"}}}
	md := scaleMarkdown(res)
	if !strings.Contains(md, "200 pods failed:** boom") {
		t.Errorf("report does not show the failed point:\n%s", md)
	}
	if c := scaleCharts(res); len(c) != 3 {
		t.Errorf("%d charts", len(c))
	}
}

// The live heap comes from a real heap profile's MemStats, taken after a
// forced collection, and the report gives it per synthetic pod against the
// agent before loading and between points.
func TestLiveHeapPerPod(t *testing.T) {
	runtime.GC()
	var buf bytes.Buffer
	if err := pprof.Lookup("heap").WriteTo(&buf, 1); err != nil {
		t.Fatal(err)
	}
	if got := parseHeapAlloc(buf.Bytes()); got <= 0 {
		t.Fatalf("HeapAlloc %d from a heap profile:\n%.2000s", got, buf.String())
	}
	if got := parseHeapAlloc([]byte("heap profile: 0: 0 [0: 0] @ heap/1048576\n")); got != -1 {
		t.Errorf("HeapAlloc %d from a profile without MemStats", got)
	}
	res := &ScaleResults{Profile: ScaleProfiles["scale"], BaseLiveHeap: 10 << 20, Points: []ScaleSize{
		{Pods: 1000, LiveHeap: 10<<20 + 1000*1500},
		{Pods: 10000, LiveHeap: 10<<20 + 10000*1200},
	}}
	md := scaleMarkdown(res)
	for _, want := range []string{"| 1000 | 11.4 MiB | 1.4 MiB | 1500 B | 1500 B |", "| 10000 | 21.4 MiB | 11.4 MiB | 1200 B | 1167 B |"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

// The marks section gives the achieved rate and scales the watch bytes
// to the asked rate.
func TestMarksMarkdown(t *testing.T) {
	res := &ScaleResults{Profile: ScaleProfiles["scale"], Points: []ScaleSize{{Pods: 1000, MarksAsked: 500,
		Marks: ScaleCond{Window: 30 * time.Second, ChangesPerSec: 250, ChangesLate: 7500, CPU: 0.05,
			API: apiCount{Writes: 3, WatchBytes: 30 * 250 * 512}}}}}
	md := scaleMarkdown(res)
	// 250 renewals/s of 512 B: 7500 KiB/min, 15000 at 500/s.
	for _, want := range []string{"## Node marks of 5000 nodes (simulated)", "| 1000 | 500 | 250 | 7500 / 0 | 0.050 | 6 | 7500 | 15000 |"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	res.Profile.MarkNodes = 0
	if md := scaleMarkdown(res); strings.Contains(md, "Node marks") {
		t.Errorf("a profile without marks reports them:\n%s", md)
	}
}

// The API counter forwards requests and streams and counts them by kind.
func TestAPICounter(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("watch") == "true" {
			for range 3 {
				fmt.Fprint(w, `{"type":"ADDED"}`+"\n")
				w.(http.Flusher).Flush()
			}
			return
		}
		fmt.Fprint(w, `{"kind":"PodList","items":[]}`)
	}))
	defer backend.Close()
	a, err := startAPICounter("", &rest.Config{Host: backend.URL})
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := a.kubeconfig(kc); err != nil {
		t.Fatal(err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		t.Fatalf("the counter's kubeconfig does not load: %v", err)
	}
	base := rc.Host
	get := func(method, path string) string {
		req, _ := http.NewRequest(method, base+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	list := get(http.MethodGet, "/api/v1/pods?limit=500")
	watch := get(http.MethodGet, "/api/v1/pods?watch=true&allowWatchBookmarks=true")
	get(http.MethodPut, "/apis/coordination.k8s.io/v1/namespaces/x/leases/y")
	c := a.read()
	want := apiCount{Watches: 1, Reads: 1, Writes: 1, Bytes: int64(2*len(list) + len(watch)), WatchBytes: int64(len(watch))}
	if c != want || strings.Count(watch, "ADDED") != 3 {
		t.Errorf("counted %+v, want %+v (watch body %q)", c, want, watch)
	}
	if d := c.minus(apiCount{Reads: 1}); d.Reads != 0 || d.Requests() != 2 {
		t.Errorf("minus: %+v", d)
	}
}
