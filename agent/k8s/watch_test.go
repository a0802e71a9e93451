package k8s

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/rest"

	"github.com/nodemesh/nodemesh/agent/k8s/apiclient"
	"github.com/nodemesh/nodemesh/agent/state"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// TestInformersWatchWithBookmarksFromTheListedVersion: after its initial
// list, every informer watches with bookmarks (so quiet resources keep
// their resume point fresh) from the resource version the list returned,
// instead of listing again; no informer resyncs.
func TestInformersWatchWithBookmarksFromTheListedVersion(t *testing.T) {
	lists := map[string]string{ // path -> kind and apiVersion of its list
		"/api/v1/namespaces": "NamespaceList v1",
		"/api/v1/nodes":      "NodeList v1",
		"/api/v1/pods":       "PodList v1",
		"/api/v1/services":   "ServiceList v1",
		"/apis/discovery.k8s.io/v1/endpointslices":   "EndpointSliceList discovery.k8s.io/v1",
		"/apis/networking.k8s.io/v1/networkpolicies": "NetworkPolicyList networking.k8s.io/v1",
	}
	var mu sync.Mutex
	listed, watched := map[string]int{}, map[string]string{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind, ok := lists[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		q := r.URL.Query()
		w.Header().Set("Content-Type", "application/json")
		if q.Get("watch") != "true" && q.Get("watch") != "1" {
			mu.Lock()
			listed[r.URL.Path]++
			mu.Unlock()
			k, v, _ := strings.Cut(kind, " ")
			fmt.Fprintf(w, `{"kind":%q,"apiVersion":%q,"metadata":{"resourceVersion":"4711"},"items":[]}`, k, v)
			return
		}
		mu.Lock()
		watched[r.URL.Path] = "allowWatchBookmarks=" + q.Get("allowWatchBookmarks") + " resourceVersion=" + q.Get("resourceVersion")
		mu.Unlock()
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer srv.Close()
	client, err := apiclient.New(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	st, err := state.NewStore(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Informers{Client: client, Store: st}).Run(ctx) }()
	waitfor.True(t, 20*time.Second, "every informer watching", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(watched) == len(lists)
	})
	time.Sleep(200 * time.Millisecond) // room for a wrong second list
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for path := range lists {
		if got := watched[path]; got != "allowWatchBookmarks=true resourceVersion=4711" {
			t.Errorf("%s watched with %q, want bookmarks from the listed version 4711", path, got)
		}
		if listed[path] != 1 {
			t.Errorf("%s listed %d times, want once", path, listed[path])
		}
	}
	if !st.Snapshot().Synced() {
		t.Error("store not synced after the lists")
	}
}
