package mesh

import (
	"bufio"
	"net"
	"net/http"
	"time"

	"github.com/nodemesh/nodemesh/agent/l7/route"
	"github.com/nodemesh/nodemesh/agent/proxy"
)

// RequestInfo describes one request the L7 layer handled, for metrics and
// access logs.
type RequestInfo struct {
	// Direction is Outbound at the source agent (the client's side, Istio's
	// reporter=source) and Inbound at the destination (reporter=destination).
	Direction proxy.Direction
	// Flow is the connection's flow; on outbound, Service is the backend
	// Service the request was routed to and Dst is not per request.
	Flow *proxy.Flow
	// Protocol is "http" or "grpc" (Istio's request_protocol).
	Protocol string
	Method   string
	Path     string
	Host     string
	// Status is the HTTP status answered (0: none was written).
	Status int
	// GRPCStatus is the grpc-status of a gRPC response, "" when unknown.
	GRPCStatus string
	// Denied is set when the destination's policy refused the request.
	Denied bool
	// Flags are Envoy's response flags, "" for none: RBAC (denied by
	// policy), RL (rate limited), FI (fault abort), UT (timeout), UF
	// (upstream connection failure), NR (no route).
	Flags    string
	Duration time.Duration
	// RequestBytes and ResponseBytes are body bytes.
	RequestBytes, ResponseBytes int64
}

// Observer learns about every request. It is called on the request's
// goroutine: it must be fast and must not keep the pointers.
type Observer interface {
	Request(ri *RequestInfo)
}

type nopObserver struct{}

func (nopObserver) Request(*RequestInfo) {}

// requestInfo fills rw.ri for the Observer (which keeps no pointer to
// it), so that it takes no allocation of its own.
func (l *Layer) requestInfo(f *proxy.Flow, r *http.Request, rw *recorder, start time.Time, dir proxy.Direction) *RequestInfo {
	ri := &rw.ri
	*ri = RequestInfo{
		Direction: dir, Flow: f, Protocol: "http", Method: r.Method, Path: r.URL.Path, Host: r.Host,
		Status: rw.status, Denied: rw.denied, Flags: rw.flags, Duration: time.Since(start), ResponseBytes: rw.bytes,
	}
	if route.IsGRPC(r) {
		ri.Protocol = "grpc"
		ri.GRPCStatus = rw.Header().Get("Grpc-Status")
		if ri.GRPCStatus == "" {
			ri.GRPCStatus = rw.Header().Get(http.TrailerPrefix + "Grpc-Status")
		}
	}
	if ri.Status == 0 && rw.wrote {
		ri.Status = http.StatusOK
	}
	if r.ContentLength > 0 {
		ri.RequestBytes = r.ContentLength
	}
	return ri
}

// recorder notes the status and body bytes of a response. Unwrap gives
// net/http's ResponseController (flushing, hijacking for upgrades) the
// underlying writer.
type recorder struct {
	http.ResponseWriter
	status int
	bytes  int64
	wrote  bool
	denied bool
	flags  string
	// ri is the request's RequestInfo, built when it is over.
	ri RequestInfo
}

// statusOr200 is the status written, 200 for a body without one, 0 for
// nothing written.
func (r *recorder) statusOr200() int {
	if r.status == 0 && r.wrote {
		return http.StatusOK
	}
	return r.status
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// setFlags notes Envoy's response flags on w if it is a recorder.
func setFlags(w http.ResponseWriter, flags string) {
	if r, ok := w.(*recorder); ok {
		r.flags = flags
	}
}

func (r *recorder) WriteHeader(code int) {
	if !r.wrote && code >= 200 || code == http.StatusSwitchingProtocols {
		r.status, r.wrote = code, true
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if !r.wrote {
		r.status, r.wrote = http.StatusOK, true
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// Flush and Hijack are found through Unwrap by ResponseController; these
// cover callers that type-assert.
func (r *recorder) Flush() { _ = http.NewResponseController(r.ResponseWriter).Flush() }

func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(r.ResponseWriter).Hijack()
}
