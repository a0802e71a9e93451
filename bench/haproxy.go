package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/nodemesh/nodemesh/bench/load"
)

// Sidecar ports. A client sidecar listens on loopback, four ports per
// upstream server (HTTP, echo and sink in TCP mode, HTTP in HTTP mode); a
// server sidecar terminates mTLS on four ports and forwards to the app on
// loopback.
const (
	sidecarOutBase   = 15001
	sidecarInHTTP    = 15443
	sidecarInEcho    = 15444
	sidecarInSink    = 15445
	sidecarInHTTPL7  = 15446
	portHTTPMode     = 3 // outPort's kind of the HTTP-mode listener
	sidecarPortKinds = 4
)

// outPort is the client sidecar's local port for upstream i and the
// given workload port kind (0 HTTP, 1 echo, 2 sink: TCP mode; 3 HTTP in
// HTTP mode).
func outPort(i, kind int) int { return sidecarOutBase + sidecarPortKinds*i + kind }

type haproxyUpstream struct {
	Index int
	IP    string
}

type haproxyConf struct {
	PidFile   string
	Cert      string
	Bundle    string
	Upstreams []haproxyUpstream // client sidecar
	Server    bool              // server sidecar
	AppHTTP   int
	AppEcho   int
	AppSink   int
}

// The sidecars run one thread each (a per-pod proxy is sized for its
// pod; Istio's default sidecar concurrency is 2), TLS 1.3 only, and verify
// the peer's certificate chain against the bundle. HAProxy cannot match a
// SPIFFE URI SAN, so it checks the chain but not the peer's exact
// identity: slightly less work than nodemesh does, which favours the
// baseline. The TCP-mode listeners (L4, like nodemesh's L4 path) serve
// scenario (d); the HTTP-mode pair serves scenario (e): both sidecars
// parse every request and response, keep connections to the next hop
// alive and reuse them, as an L7 sidecar does.
var haproxyTmpl = template.Must(template.New("haproxy").Funcs(template.FuncMap{"out": outPort}).Parse(`global
  nbthread 1
  maxconn 4000
  pidfile {{.PidFile}}
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode tcp
  timeout connect 5s
  timeout client 10m
  timeout server 10m
{{- range .Upstreams}}
listen out-{{.Index}}-http
  bind 127.0.0.1:{{out .Index 0}}
  server s {{.IP}}:15443 ssl crt {{$.Cert}} ca-file {{$.Bundle}} verify required
listen out-{{.Index}}-echo
  bind 127.0.0.1:{{out .Index 1}}
  server s {{.IP}}:15444 ssl crt {{$.Cert}} ca-file {{$.Bundle}} verify required
listen out-{{.Index}}-sink
  bind 127.0.0.1:{{out .Index 2}}
  server s {{.IP}}:15445 ssl crt {{$.Cert}} ca-file {{$.Bundle}} verify required
listen out-{{.Index}}-http-mode
  mode http
  option http-keep-alive
  bind 127.0.0.1:{{out .Index 3}}
  server s {{.IP}}:15446 ssl crt {{$.Cert}} ca-file {{$.Bundle}} verify required
{{- end}}
{{- if .Server}}
listen in-http
  bind :15443 ssl crt {{.Cert}} ca-file {{.Bundle}} verify required
  server app 127.0.0.1:{{.AppHTTP}}
listen in-echo
  bind :15444 ssl crt {{.Cert}} ca-file {{.Bundle}} verify required
  server app 127.0.0.1:{{.AppEcho}}
listen in-sink
  bind :15445 ssl crt {{.Cert}} ca-file {{.Bundle}} verify required
  server app 127.0.0.1:{{.AppSink}}
listen in-http-mode
  mode http
  option http-keep-alive
  bind :15446 ssl crt {{.Cert}} ca-file {{.Bundle}} verify required
  server app 127.0.0.1:{{.AppHTTP}}
{{- end}}
`))

func renderHAProxy(c haproxyConf) ([]byte, error) {
	for _, p := range []string{c.PidFile, c.Cert, c.Bundle} {
		if p == "" || strings.ContainsAny(p, " \t\n#\\'\"") {
			return nil, fmt.Errorf("haproxy config: path %q must be non-empty without spaces or quotes", p)
		}
	}
	if c.Server && c.AppHTTP == 0 {
		c.AppHTTP, c.AppEcho, c.AppSink = load.DefaultHTTPPort, load.DefaultEchoPort, load.DefaultSinkPort
	}
	var b bytes.Buffer
	if err := haproxyTmpl.Execute(&b, c); err != nil {
		return nil, fmt.Errorf("rendering the haproxy config: %w", err)
	}
	return b.Bytes(), nil
}

// haproxyBinary finds haproxy, with what to install when it is missing.
func haproxyBinary() (string, error) {
	for _, p := range []string{"/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("haproxy not found: install it (apt-get install -y haproxy) for the sidecar baseline")
}

// startHAProxy writes the config to dir and starts HAProxy as a daemon in
// the pod (its netns and cgroup, so the lab's Down removes it too) and
// returns its pid.
func startHAProxy(ctx context.Context, ex podExecer, pod, bin, dir string, c haproxyConf) (int, error) {
	c.PidFile = filepath.Join(dir, "haproxy.pid")
	cfg, err := renderHAProxy(c)
	if err != nil {
		return 0, err
	}
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, cfg, 0o600); err != nil {
		return 0, fmt.Errorf("writing %s: %w", path, err)
	}
	if out, err := ex.Exec(ctx, pod, []string{bin, "-c", "-q", "-f", path}); err != nil {
		return 0, fmt.Errorf("checking the haproxy config for %s: %w (%s)", pod, err, strings.TrimSpace(string(out)))
	}
	if _, err := ex.Exec(ctx, pod, []string{bin, "-D", "-f", path}); err != nil {
		return 0, fmt.Errorf("starting haproxy in %s: %w", pod, err)
	}
	// The pid file is written by the daemonised child; give it a moment.
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(c.PidFile)
		if err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				return pid, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("haproxy in %s wrote no pid file %s", pod, c.PidFile)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// podExecer is the part of *lab.Lab the sidecar code uses.
type podExecer interface {
	Exec(ctx context.Context, pod string, argv []string) ([]byte, error)
}
