package inpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// Do runs fn with the calling goroutine's OS thread inside the network
// namespace at nsPath (for example /var/run/netns/<name> or
// /proc/<pid>/ns/net). Sockets created by fn belong to that namespace for
// their whole life. fn runs on a dedicated, locked OS thread; if the thread
// cannot be moved back to its original namespace it is discarded rather
// than reused, so no other goroutine ever runs in the pod's namespace.
func Do(nsPath string, fn func() error) error {
	target, err := os.Open(nsPath)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", nsPath, err)
	}
	defer target.Close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(target.Fd()), &st); err != nil {
		return fmt.Errorf("checking network namespace %s: %w", nsPath, err)
	}
	if st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC {
		return fmt.Errorf("%s is not a network namespace file (filesystem type %#x)", nsPath, st.Type)
	}

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening the current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace %s: %w", nsPath, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Stay locked: the runtime terminates a locked thread whose
			// goroutine exits, so the thread in the wrong namespace dies.
			errc <- errors.Join(ferr, fmt.Errorf("returning from network namespace %s: %w", nsPath, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// NetnsCookie returns the kernel's cookie for the network namespace of the
// socket c (SO_NETNS_COOKIE, Linux 5.14+). It is the key the capture
// programs use for enrollment.
func NetnsCookie(c syscall.Conn) (uint64, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("getting raw socket: %w", err)
	}
	var cookie uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	}); err != nil {
		return 0, fmt.Errorf("reading SO_NETNS_COOKIE: %w", err)
	}
	if serr != nil {
		return 0, fmt.Errorf("reading SO_NETNS_COOKIE (needs Linux 5.14+): %w", serr)
	}
	return cookie, nil
}

// ListenTCP opens a plain (non-MPTCP) TCP listener on addr inside the
// network namespace at nsPath. An empty nsPath means the caller's namespace.
func ListenTCP(ctx context.Context, nsPath, network, addr string) (*net.TCPListener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	var ln net.Listener
	listen := func() error {
		var err error
		ln, err = lc.Listen(ctx, network, addr)
		return err
	}
	var err error
	if nsPath == "" {
		err = listen()
	} else {
		err = Do(nsPath, listen)
	}
	if err != nil {
		return nil, fmt.Errorf("listening on %s in %s: %w", addr, nsName(nsPath), err)
	}
	return ln.(*net.TCPListener), nil
}

// Dialer dials TCP from inside a network namespace. Sockets get SO_MARK
// Mark when it is non-zero; the agent uses its capture bypass mark so that
// its own connections (inbound delivery to the app, passthrough) are never
// redirected back to itself.
type Dialer struct {
	// Netns is the namespace path; empty means the caller's namespace.
	Netns string
	// Mark is the SO_MARK for the socket; 0 leaves it unset.
	Mark uint32
	// LocalAddr optionally binds the local side.
	LocalAddr *net.TCPAddr
}

// DialContext connects to addr ("ip:port", no name resolution: it would
// run in the pod's namespace with the host's resolver configuration).
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (*net.TCPConn, error) {
	nd := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		if d.Mark == 0 {
			return nil
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(d.Mark))
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("setting SO_MARK %#x capture bypass (needs CAP_NET_ADMIN): %w", d.Mark, serr)
		}
		return nil
	}}
	if d.LocalAddr != nil {
		nd.LocalAddr = d.LocalAddr
	}
	var c net.Conn
	dial := func() error {
		var err error
		c, err = nd.DialContext(ctx, network, addr)
		return err
	}
	var err error
	if d.Netns == "" {
		err = dial()
	} else {
		err = Do(d.Netns, dial)
	}
	if err != nil {
		return nil, fmt.Errorf("dialing %s from %s: %w", addr, nsName(d.Netns), err)
	}
	return c.(*net.TCPConn), nil
}

func nsName(p string) string {
	if p == "" {
		return "the agent's network namespace"
	}
	return "network namespace " + p
}

// Cookie returns the cookie of the network namespace at nsPath, read from a
// throw-away socket created inside it.
func Cookie(nsPath string) (uint64, error) {
	var cookie uint64
	err := Do(nsPath, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("creating a socket: %w", err)
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("reading SO_NETNS_COOKIE (needs Linux 5.14+): %w", err)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("finding the cookie of network namespace %s: %w", nsPath, err)
	}
	return cookie, nil
}
