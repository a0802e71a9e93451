package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Sandbox is a pod sandbox the plugin reported: the request and the
// network namespace that came with it.
type Sandbox struct {
	Request
	// Netns is the namespace file. The Enroller owns it from the moment
	// EnrollPod is called and must close it when it no longer needs it.
	Netns *os.File
}

// Enroller is the agent's enrollment as the server uses it.
type Enroller interface {
	// EnrollPod returns once the pod of sb is captured (ResultEnrolled),
	// or the agent does not mesh it (ResultSkipped, with a reason), or
	// with an error when ctx ends or the pod cannot be enrolled. It owns
	// sb.Netns.
	EnrollPod(ctx context.Context, sb Sandbox) (result, reason string, err error)
	// Forget drops the namespace reported for the pod's sandbox
	// containerID (CNI DEL).
	Forget(uid, namespace, name, containerID string)
}

// ServerConfig configures a Server.
type ServerConfig struct {
	// Path is the socket's path; its directory is created 0700.
	Path     string
	Enroller Enroller
	Log      *slog.Logger
	// Timeout bounds one ADD (default 30 s; the plugin has its own).
	Timeout time.Duration
	// AllowUID is the only peer uid admitted (default 0, root; tests set
	// their own).
	AllowUID *uint32
}

// Server answers the plugin on a unix socket.
type Server struct {
	cfg ServerConfig
	log *slog.Logger
}

// NewServer checks cfg.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Path == "" || !filepath.IsAbs(cfg.Path) {
		return nil, fmt.Errorf("the CNI socket path %q must be absolute", cfg.Path)
	}
	if cfg.Enroller == nil {
		return nil, errors.New("creating the CNI server: an Enroller is required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.AllowUID == nil {
		root := uint32(0)
		cfg.AllowUID = &root
	}
	return &Server{cfg: cfg, log: cfg.Log}, nil
}

// Listen creates the socket, replacing one a previous agent left behind
// (it crashed, or was killed before removing it).
func (s *Server) Listen() (*net.UnixListener, error) {
	dir := filepath.Dir(s.cfg.Path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating the CNI socket's directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("making the CNI socket's directory %s root-only: %w", dir, err)
	}
	if err := os.Remove(s.cfg.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing a stale CNI socket: %w", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.cfg.Path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listening on the CNI socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(s.cfg.Path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("making the CNI socket root-only: %w", err)
	}
	return ln, nil
}

// Serve answers requests on ln until ctx ends, then closes ln (removing
// the socket: the plugin then fails closed until the next agent listens)
// and waits for the requests in flight.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	s.log.Info("CNI plugin socket listening", "path", s.cfg.Path)
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accepting on the CNI socket: %w", err)
		}
		wg.Go(func() { s.handle(ctx, c) })
	}
}

// Run listens and serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	ln, err := s.Listen()
	if err != nil {
		return err
	}
	return s.Serve(ctx, ln)
}

func (s *Server) handle(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	req, netns, err := s.read(c)
	if err != nil {
		s.log.Warn("CNI plugin request refused", "err", err)
		s.reply(c, Reply{Error: trimErr(err)})
		return
	}
	log := s.log.With("pod", req.Pod(), "command", req.Command)
	if req.Command == CommandDel {
		// read left no descriptor open for a DEL.
		s.cfg.Enroller.Forget(req.UID, req.Namespace, req.Name, req.ContainerID)
		s.reply(c, Reply{Result: ResultForgotten})
		return
	}
	start := time.Now()
	result, reason, err := s.cfg.Enroller.EnrollPod(ctx, Sandbox{Request: req, Netns: netns})
	took := time.Since(start).Round(time.Millisecond)
	if err != nil {
		log.Warn("pod not enrolled at sandbox creation; its sandbox fails and kubelet retries", "err", err, "took", took)
		s.reply(c, Reply{Error: trimErr(err)})
		return
	}
	log.Info("pod sandbox answered", "result", result, "reason", reason, "took", took)
	s.reply(c, Reply{Result: result, Reason: reason})
}

// read reads one request and its descriptor, and checks the peer.
func (s *Server) read(c *net.UnixConn) (Request, *os.File, error) {
	var req Request
	var (
		body  []byte
		files []*os.File
		buf   = make([]byte, 4096)
		oob   = make([]byte, unix.CmsgSpace(4*4))
	)
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			fs, perr := parseRights(oob[:oobn])
			files = append(files, fs...)
			if perr != nil {
				closeAll()
				return req, nil, perr
			}
		}
		body = append(body, buf[:n]...)
		if len(body) > MaxMessage {
			closeAll()
			return req, nil, fmt.Errorf("request longer than %d bytes", MaxMessage)
		}
		if errors.Is(err, io.EOF) || (err == nil && n == 0) {
			break
		}
		if err != nil {
			closeAll()
			return req, nil, fmt.Errorf("reading the request: %w", err)
		}
	}
	// The peer is checked once its request is read, so that a refused
	// plugin reads the reason rather than a broken pipe.
	if err := s.checkPeer(c); err != nil {
		closeAll()
		return req, nil, err
	}
	if err := json.Unmarshal(body, &req); err != nil {
		closeAll()
		return req, nil, fmt.Errorf("decoding the request: %w", err)
	}
	if err := req.Validate(); err != nil {
		closeAll()
		return req, nil, fmt.Errorf("invalid request for pod %s: %w", req.Pod(), err)
	}
	switch {
	case len(files) > 1:
		closeAll()
		return req, nil, fmt.Errorf("request for pod %s came with %d descriptors, want one", req.Pod(), len(files))
	case req.Command == CommandAdd && len(files) == 0:
		return req, nil, fmt.Errorf("ADD for pod %s came without its network namespace", req.Pod())
	case len(files) == 1 && req.Command == CommandAdd:
		if err := IsNetns(files[0]); err != nil {
			closeAll()
			return req, nil, fmt.Errorf("ADD for pod %s: %w", req.Pod(), err)
		}
		return req, files[0], nil
	}
	closeAll()
	return req, nil, nil
}

func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parsing the request's control message: %w", err)
	}
	var out []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			out = append(out, os.NewFile(uintptr(fd), "netns"))
		}
	}
	return out, nil
}

func (s *Server) checkPeer(c *net.UnixConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("reading the peer's credentials: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return fmt.Errorf("reading the peer's credentials: %w", err)
	}
	if cerr != nil {
		return fmt.Errorf("reading the peer's credentials: %w", cerr)
	}
	if cred.Uid != *s.cfg.AllowUID {
		return fmt.Errorf("peer pid %d runs as uid %d; only uid %d may use the CNI socket", cred.Pid, cred.Uid, *s.cfg.AllowUID)
	}
	return nil
}

func (s *Server) reply(c *net.UnixConn, r Reply) {
	_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := json.NewEncoder(c).Encode(r); err != nil {
		s.log.Debug("writing the CNI reply", "err", err)
	}
}
