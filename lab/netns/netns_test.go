package netns

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/lab/privtest"
)

const testPrefix = "nmtnetns-"

func sweepTest(t *testing.T) {
	names, err := List(testPrefix)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		_ = exec.Command("ip", "netns", "del", n).Run()
	}
}

func TestPrivNetnsDoStartIP(t *testing.T) {
	privtest.Root(t)
	sweepTest(t)
	t.Cleanup(func() { sweepTest(t) })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	before, err := threadNetns()
	if err != nil {
		t.Fatal(err)
	}
	a, b := testPrefix+"a", testPrefix+"b"
	if err := IP(ctx, "", []string{"netns add " + a, "netns add " + b, "link add nmtnetns0 type veth peer name eth0 netns " + b, "link set nmtnetns0 netns " + a}); err != nil {
		t.Fatal(err)
	}
	if err := IP(ctx, a, []string{"link set lo up", "addr add 10.99.0.1/24 dev nmtnetns0", "link set nmtnetns0 up"}); err != nil {
		t.Fatal(err)
	}
	if err := IP(ctx, b, []string{"link set lo up", "addr add 10.99.0.2/24 dev eth0", "link set eth0 up"}); err != nil {
		t.Fatal(err)
	}
	// A failing batch names the namespace and the output.
	if err := IP(ctx, a, []string{"link set nosuchlink up"}); err == nil || !strings.Contains(err.Error(), a) {
		t.Errorf("failing batch: err = %v", err)
	}

	// Links sees the namespace's own interfaces, not the host's.
	links, err := Links(Path(a))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(links, ",") != "lo,nmtnetns0" {
		t.Errorf("links in %s = %v", a, links)
	}

	// A listener created inside b (Do) is reachable from a process born in a (Start).
	var ln net.Listener
	if err := Do(Path(b), func() error {
		var err error
		ln, err = net.Listen("tcp4", "10.99.0.2:7777")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("hi from b\n"))
			c.Close()
		}
	}()
	out, err := Run(ctx, Path(a), nil, "bash", "-c", "exec 3<>/dev/tcp/10.99.0.2/7777; cat <&3")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte("hi from b")) {
		t.Errorf("got %q", out)
	}
	// The caller's own namespace is untouched.
	// Threads other than the discarded ones stay in the host namespace.
	// (/proc/self/ns/net would show the main thread's, which the runtime
	// may have parked, still in a namespace, after a Do.)
	if after, err := threadNetns(); err != nil || after != before {
		t.Errorf("the test process left the host namespace")
	}
	// A sysctl written inside a is a's, not the host's.
	if err := WriteSysctl(Path(a), "net/ipv4/ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	out, err = Run(ctx, Path(a), nil, "cat", "/proc/sys/net/ipv4/ip_forward")
	if err != nil || strings.TrimSpace(string(out)) != "1" {
		t.Errorf("ip_forward in %s = %q, %v", a, out, err)
	}
	if _, err := os.Stat(Path(a)); err != nil {
		t.Fatal(err)
	}
	if err := Do(Path(testPrefix+"missing"), func() error { return nil }); err == nil {
		t.Error("entering a missing namespace succeeded")
	}
}

// threadNetns returns the namespace of a fresh, ordinary thread.
func threadNetns() (uint64, error) {
	type res struct {
		ino uint64
		err error
	}
	c := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		ino, err := Inode("/proc/thread-self/ns/net")
		c <- res{ino, err}
	}()
	r := <-c
	return r.ino, r.err
}
