// Package cni is the node agent's end of the nodemesh CNI plugin
// (cmd/nodemesh-cni), which closes the window between a pod's network
// namespace coming up and its capture (docs/capture.md, "Enrollment at
// sandbox creation").
//
// During a pod's CNI ADD, after the cluster's network plugin has set up
// the pod's namespace and before the container runtime starts any of the
// pod's containers, the plugin connects to the agent's unix socket, sends
// a Request with the namespace as an open file descriptor (SCM_RIGHTS) and
// waits for the Reply. The agent enrolls the pod through its usual
// reconcile (the same plan and enrollment as every other pod) and answers
// once capture is in place, or that it does not mesh the pod. Any other
// outcome fails the ADD, so the runtime tears the sandbox down and kubelet
// tries again: a pod that must be meshed never runs uncaptured.
//
// The socket is the only way in: its directory is root-only (0700), the
// socket 0600, and the server also refuses peers that are not uid 0
// (SO_PEERCRED). A descriptor that is not a network namespace is refused.
package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Commands of a Request.
const (
	// CommandAdd: enroll the pod whose namespace comes with the request
	// (CNI ADD), and answer when capture is in place.
	CommandAdd = "ADD"
	// CommandDel: the pod's sandbox is going away (CNI DEL); the agent
	// forgets the namespace it was given. No descriptor comes with it.
	CommandDel = "DEL"
)

// Results of a Reply without an error.
const (
	// ResultEnrolled: the pod is captured; its containers may start.
	ResultEnrolled = "enrolled"
	// ResultSkipped: the agent does not mesh this pod (Reason says why:
	// its namespace is not enrolled, it opted out, ...).
	ResultSkipped = "skipped"
	// ResultForgotten answers a CommandDel.
	ResultForgotten = "forgotten"
)

// MaxMessage bounds a Request or Reply on the wire.
const MaxMessage = 64 << 10

// Request is what the plugin sends, once per connection.
type Request struct {
	Command string `json:"command"`
	// Namespace, Name and UID identify the pod (CNI_ARGS K8S_POD_*). A
	// runtime that passes no UID leaves it empty: the agent then takes the
	// live pod of that name.
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
	// ContainerID is the sandbox's ID (CNI_CONTAINERID): a DEL forgets
	// only the namespace its own sandbox reported.
	ContainerID string `json:"containerId"`
	// IPs are the pod's addresses from the previous plugin's result
	// (kubelet has not written them to the API yet).
	IPs []netip.Addr `json:"ips,omitempty"`
}

// Validate checks a request as received (the descriptor is checked apart).
func (r *Request) Validate() error {
	var errs []error
	switch r.Command {
	case CommandAdd, CommandDel:
	default:
		errs = append(errs, fmt.Errorf("command %q: want %s or %s", r.Command, CommandAdd, CommandDel))
	}
	if r.Namespace == "" || r.Name == "" {
		errs = append(errs, errors.New("pod namespace and name are required"))
	}
	if r.ContainerID == "" {
		errs = append(errs, errors.New("the sandbox's container ID is required"))
	}
	if r.Command == CommandAdd {
		for _, ip := range r.IPs {
			if !ip.IsValid() || ip.IsUnspecified() {
				errs = append(errs, fmt.Errorf("pod address %s is not usable", ip))
			}
		}
	}
	return errors.Join(errs...)
}

// Pod returns "namespace/name".
func (r *Request) Pod() string { return r.Namespace + "/" + r.Name }

// Reply is the agent's answer. Error set means the ADD must fail.
type Reply struct {
	Result string `json:"result,omitempty"`
	Reason string `json:"reason,omitempty"`
	Error  string `json:"error,omitempty"`
}

// ErrAgentUnreachable wraps every failure to reach the agent (no socket,
// connection refused): the plugin reports it as "try again later".
var ErrAgentUnreachable = errors.New("nodemesh agent unreachable")

// Send sends req (with netns, for CommandAdd) to the agent at socket and
// returns its reply. It gives up when ctx ends.
func Send(ctx context.Context, socket string, req Request, netns *os.File) (Reply, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return Reply{}, fmt.Errorf("encoding the request: %w", err)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return Reply{}, fmt.Errorf("%w at %s: %w", ErrAgentUnreachable, socket, err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	var oob []byte
	if netns != nil {
		oob = unix.UnixRights(int(netns.Fd()))
	}
	n, oobn, err := conn.WriteMsgUnix(body, oob, nil)
	if err == nil && (n != len(body) || oobn != len(oob)) {
		err = fmt.Errorf("short write (%d of %d bytes)", n, len(body))
	}
	if err == nil {
		err = conn.CloseWrite()
	}
	if err != nil {
		return Reply{}, fmt.Errorf("sending the request to the nodemesh agent at %s: %w", socket, err)
	}
	var rep Reply
	dec := json.NewDecoder(&limitedReader{r: conn, n: MaxMessage})
	if err := dec.Decode(&rep); err != nil {
		if ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
			cause := ctx.Err()
			if cause == nil {
				cause = context.DeadlineExceeded
			}
			return Reply{}, fmt.Errorf("waiting for the nodemesh agent at %s to enroll pod %s: %w", socket, req.Pod(), cause)
		}
		return Reply{}, fmt.Errorf("reading the nodemesh agent's reply from %s: %w", socket, err)
	}
	return rep, nil
}

type limitedReader struct {
	r interface{ Read([]byte) (int, error) }
	n int
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, fmt.Errorf("message longer than %d bytes", MaxMessage)
	}
	if len(p) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= n
	return n, err
}

// IsNetns reports whether f is a network namespace file (nsfs, type
// CLONE_NEWNET).
func IsNetns(f *os.File) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("checking the namespace descriptor: %w", err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("the descriptor is not a namespace (filesystem type %#x)", st.Type)
	}
	t, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("checking the namespace type: %w", err)
	}
	if t != unix.CLONE_NEWNET {
		return fmt.Errorf("the descriptor is a namespace of type %#x, not a network namespace", t)
	}
	return nil
}

// trimErr shortens an error for a reply (kubelet shows it in the pod's
// events).
func trimErr(err error) string {
	s := err.Error()
	if len(s) > 2000 {
		s = s[:2000] + "..."
	}
	return strings.TrimSpace(s)
}
