// Package netns runs code, commands and iproute2 batches inside named
// network namespaces (the /run/netns/<name> files that `ip netns` manages).
//
// Entering a namespace is done with setns(2) on a goroutine locked to its
// OS thread; that thread is never unlocked, so the Go runtime discards it
// when the goroutine returns and no other goroutine ever runs in the
// namespace by accident. A process started from that thread (Start) is
// born in the namespace.
package netns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Dir is where iproute2 keeps named network namespaces.
const Dir = "/run/netns"

// Path returns the file of the named namespace.
func Path(name string) string { return filepath.Join(Dir, name) }

// List returns the names of namespaces under Dir that start with prefix.
func List(prefix string) ([]string, error) {
	ents, err := os.ReadDir(Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", Dir, err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out, nil
}

// Do runs fn on an OS thread that has entered the network namespace at
// path and is thrown away afterwards. An empty path runs fn in the
// caller's namespace (still on a locked thread).
func Do(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread may be in another namespace, so it
		// must die with this goroutine.
		if path != "" {
			fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				errc <- fmt.Errorf("opening network namespace %s: %w", path, err)
				return
			}
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
			if err != nil {
				errc <- fmt.Errorf("entering network namespace %s: %w", path, err)
				return
			}
		}
		errc <- fn()
	}()
	return <-errc
}

// Start starts cmd inside the network namespace at path ("" = the
// caller's). The caller still owns cmd and must Wait for it.
func Start(path string, cmd *exec.Cmd) error {
	return Do(path, cmd.Start)
}

// Run runs argv inside the namespace at path and returns its combined
// output; a failure includes the output in the error.
func Run(ctx context.Context, path string, stdin []byte, argv ...string) ([]byte, error) {
	if len(argv) == 0 {
		return nil, errors.New("netns.Run: empty argv")
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if err := Start(path, cmd); err != nil {
		return nil, fmt.Errorf("starting %s: %w", argv[0], err)
	}
	if err := cmd.Wait(); err != nil {
		return out.Bytes(), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

// IP runs iproute2 commands (one per line, without the leading "ip") as a
// single batch, inside the named namespace ns ("" = the caller's). The
// batch stops at the first failing line, which the error names.
func IP(ctx context.Context, ns string, lines []string) error {
	if len(lines) == 0 {
		return nil
	}
	args := []string{"ip"}
	if ns != "" {
		args = append(args, "-n", ns)
	}
	args = append(args, "-batch", "-")
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		where := "the host"
		if ns != "" {
			where = "network namespace " + ns
		}
		return fmt.Errorf("running ip in %s: %w: %s", where, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Links returns the interface names in the namespace at path.
func Links(path string) ([]string, error) {
	var names []string
	err := Do(path, func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return fmt.Errorf("listing interfaces: %w", err)
		}
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return nil
	})
	return names, err
}

// WriteSysctl writes value to /proc/sys/<key> (key with '/' separators)
// inside the namespace at path.
func WriteSysctl(path, key, value string) error {
	return Do(path, func() error {
		if err := os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644); err != nil {
			return fmt.Errorf("setting sysctl %s=%s: %w", key, value, err)
		}
		return nil
	})
}

// Inode returns the namespace identity (inode) of the file at path, which
// may be a /run/netns file or a /proc/<pid>/ns/net link.
func Inode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Ino, nil
}
