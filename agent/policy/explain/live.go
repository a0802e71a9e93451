package explain

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nodemesh/nodemesh/agent/policy"
)

// Path is where an agent's admin API serves Handler.
const Path = "/policy/explain"

// Handler serves live explain for an agent's admin API: GET Path with query
// parameters src, dst (namespace/pod or IP), port, protocol (default TCP),
// principal or plaintext=true, direction (both, egress, ingress), and for an
// HTTP request method, path, host and header (name=value, repeated). It
// answers with the policy.Decision as JSON, computed on the snapshot
// current() returns at the time of the request, or 400 with
// {"error": "..."}. current must be safe for concurrent use and return the
// snapshot the agent enforces; claimed reports whether a pod's port
// (namespace/name) is handled at L7 by this agent's view (nil: none is).
func Handler(current func() *policy.Snapshot, claimed func(pod string, port uint16) bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", http.MethodGet)
			httpError(w, http.StatusMethodNotAllowed, errors.New("use GET"))
			return
		}
		q := r.URL.Query()
		o := options{
			src: q.Get("src"), dst: q.Get("dst"), protocol: q.Get("protocol"),
			principal: q.Get("principal"), direction: q.Get("direction"), output: "json",
			method: q.Get("method"), path: q.Get("path"), host: q.Get("host"), headers: q["header"],
		}
		if o.protocol == "" {
			o.protocol = "TCP"
		}
		if o.direction == "" {
			o.direction = "both"
		}
		if v := q.Get("plaintext"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				httpError(w, http.StatusBadRequest, fmt.Errorf("plaintext=%q: want true or false", v))
				return
			}
			o.plaintext = b
		}
		port, err := strconv.ParseUint(q.Get("port"), 10, 16)
		if err != nil {
			httpError(w, http.StatusBadRequest, fmt.Errorf("port=%q: want 1-65535", q.Get("port")))
			return
		}
		o.port = uint(port)
		if err := o.validate(); err != nil {
			httpError(w, http.StatusBadRequest, err)
			return
		}
		snap := current()
		if snap == nil {
			httpError(w, http.StatusServiceUnavailable, errors.New("the agent has no policy snapshot yet"))
			return
		}
		d, err := explain(snap, claimed, &o)
		if err != nil {
			httpError(w, http.StatusBadRequest, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(d)
	})
}

func httpError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
}

// askAgent asks a running agent's admin API (live explain).
func askAgent(ctx context.Context, o *options) (*policy.Decision, error) {
	base, err := url.Parse(strings.TrimSuffix(o.agent, "/"))
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return nil, fmt.Errorf("--agent %q: want a URL like http://127.0.0.1:15000", o.agent)
	}
	q := url.Values{}
	q.Set("src", o.src)
	q.Set("dst", o.dst)
	q.Set("port", strconv.FormatUint(uint64(o.port), 10))
	q.Set("protocol", o.protocol)
	q.Set("direction", o.direction)
	if o.principal != "" {
		q.Set("principal", o.principal)
	}
	if o.plaintext {
		q.Set("plaintext", "true")
	}
	for k, v := range map[string]string{"method": o.method, "path": o.path, "host": o.host} {
		if v != "" {
			q.Set(k, v)
		}
	}
	for _, h := range o.headers {
		q.Add("header", h)
	}
	u := base.JoinPath(Path)
	u.RawQuery = q.Encode()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("building the request to %s: %w", u, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("asking the agent at %s (is it running, and is its admin port reachable from here?): %w", base, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("reading the agent's answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return nil, fmt.Errorf("the agent at %s refused: %s", base, e.Error)
		}
		return nil, fmt.Errorf("the agent at %s answered %s", base, resp.Status)
	}
	var d policy.Decision
	if err := json.Unmarshal(body, &d); err != nil {
		return nil, fmt.Errorf("decoding the agent's answer: %w", err)
	}
	if d.Verdict != policy.Allow && d.Verdict != policy.Deny {
		return nil, fmt.Errorf("the agent answered an unknown verdict %q", d.Verdict)
	}
	return &d, nil
}
