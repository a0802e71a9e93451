package redirect

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/inpod"
)

// setupAccel attaches sk_msg to the sockhash (and sockops to the agent's
// cgroup, for the agent's end of captured connections), then runs the
// self-test. Any failure leaves acceleration off with the reason recorded.
func (c *Capture) setupAccel(ctx context.Context) {
	fail := func(why string, err error) {
		c.accel = false
		c.accelWhy = fmt.Sprintf("%s: %v", why, err)
		c.log.Warn("same-node acceleration disabled", "reason", c.accelWhy)
	}
	if !within(c.cfg.AgentCgroup, c.cfg.CgroupRoot) {
		if err := c.attachCgroup("sockops-agent", c.cfg.AgentCgroup, ebpf.AttachCGroupSockOps, c.objs.NmSockops); err != nil {
			fail("attaching sockops at the agent's cgroup", err)
			return
		}
	} else {
		c.dropPinnedLink("sockops-agent")
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: c.objs.Sockhash.FD(), Program: c.objs.NmSkmsg, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		fail("attaching sk_msg to the sockhash", err)
		return
	}
	c.skmsg = true
	if err := c.accelSelfTest(ctx); err != nil {
		fail("self-test failed", err)
		return
	}
	if err := c.setAccelFlag(true); err != nil {
		fail("enabling", err)
		return
	}
	c.accel, c.accelOK = true, true
	c.accelWhy = "self-test passed"
}

// accelSelfTest runs a loopback connection in the agent's own namespace
// through the same sockops and sk_msg programs that captured connections
// use (the accel_probe map marks its port), and checks that bytes cross
// both ways intact, in order, through the redirect, and that EOF arrives.
func (c *Capture) accelSelfTest(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ln, err := inpod.ListenTCP(ctx, "", "tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	cookie, err := inpod.NetnsCookie(ln)
	if err != nil {
		return err
	}
	port := uint32(ln.Addr().(*net.TCPAddr).Port)
	key := capturePortKey{Netns: cookie, Port: port}
	if err := c.objs.AccelProbe.Put(key, uint8(1)); err != nil {
		return fmt.Errorf("marking the self-test port: %w", err)
	}
	defer c.objs.AccelProbe.Delete(key)
	before, err := c.Stats()
	if err != nil {
		return err
	}

	d := inpod.Dialer{Mark: c.cfg.Mark}
	cl, err := d.DialContext(ctx, "tcp4", ln.Addr().String())
	if err != nil {
		return err
	}
	defer cl.Close()
	if dl, ok := ctx.Deadline(); ok {
		ln.SetDeadline(dl)
		cl.SetDeadline(dl)
	}
	sv, err := ln.AcceptTCP()
	if err != nil {
		return fmt.Errorf("accepting the self-test connection: %w", err)
	}
	defer sv.Close()
	if dl, ok := ctx.Deadline(); ok {
		sv.SetDeadline(dl)
	}
	// Both ends must be in the sockhash, or nothing would be redirected.
	after, err := c.Stats()
	if err != nil {
		return err
	}
	if added := after["sockhash_added"] - before["sockhash_added"]; added < 2 {
		return fmt.Errorf("sockops added %d of 2 self-test sockets to the sockhash", added)
	}

	// Small messages both ways, then a bulk transfer, then EOF.
	for i := range 50 {
		msg := fmt.Appendf(nil, "ping %03d", i)
		if err := roundTrip(cl, sv, msg); err != nil {
			return fmt.Errorf("message %d client->server: %w", i, err)
		}
		if err := roundTrip(sv, cl, msg); err != nil {
			return fmt.Errorf("message %d server->client: %w", i, err)
		}
	}
	bulk := make([]byte, 4<<20)
	rand.Read(bulk)
	errc := make(chan error, 1)
	go func() {
		_, err := cl.Write(bulk)
		if err == nil {
			err = cl.CloseWrite()
		}
		errc <- err
	}()
	got, rerr := io.ReadAll(sv)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("bulk write: %w", werr)
	}
	if rerr != nil {
		return fmt.Errorf("bulk read: %w", rerr)
	}
	if !bytes.Equal(got, bulk) {
		return fmt.Errorf("bulk transfer corrupted: got %d bytes, want %d (or reordered)", len(got), len(bulk))
	}
	final, err := c.Stats()
	if err != nil {
		return err
	}
	if final["msg_redirected"] == before["msg_redirected"] {
		return errors.New("sk_msg redirected no message")
	}
	if c.cfg.Accel != AccelForce {
		if err := c.spliceCheck(ctx, ln); err != nil {
			return err
		}
	}
	return nil
}

// spliceCheck verifies that splice(2) on an accelerated socket sees the
// bytes sk_msg redirected into it. Applications (haproxy, for one) and Go's
// io.Copy between two TCP connections read with splice; a kernel whose
// splice path ignores the sockmap receive queue would make them see a
// premature EOF or hang, so acceleration must stay off there.
func (c *Capture) spliceCheck(ctx context.Context, ln *net.TCPListener) error {
	// sk_msg redirects within sendmsg: the bytes are queued at the peer
	// when Write returns, so a short wait is plenty.
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	d := inpod.Dialer{Mark: c.cfg.Mark}
	cl, err := d.DialContext(ctx, "tcp4", ln.Addr().String())
	if err != nil {
		return err
	}
	defer cl.Close()
	sv, err := ln.AcceptTCP()
	if err != nil {
		return fmt.Errorf("accepting the splice check connection: %w", err)
	}
	defer sv.Close()
	msg := []byte("nodemesh splice check")
	if _, err := cl.Write(msg); err != nil {
		return err
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return fmt.Errorf("splice check: %w", err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	fd, err := socketFD(sv)
	if err != nil {
		return err
	}
	got := 0
	for got < len(msg) {
		n, err := unix.Splice(fd, nil, p[1], nil, len(msg)-got, unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EAGAIN || err == unix.EINTR:
			select {
			case <-ctx.Done():
				return fmt.Errorf("splice(2) did not see %d redirected bytes (kernel sockmap/splice bug); applications that splice would hang", len(msg)-got)
			case <-time.After(10 * time.Millisecond):
			}
			continue
		case err != nil:
			return fmt.Errorf("splice(2) from an accelerated socket: %w", err)
		case n == 0:
			return fmt.Errorf("splice(2) from an accelerated socket reported EOF after %d of %d bytes: redirected data is invisible to splice on this kernel, so applications that splice would lose data", got, len(msg))
		}
		got += int(n)
	}
	buf := make([]byte, len(msg))
	if _, err := unix.Read(p[0], buf); err != nil || !bytes.Equal(buf, msg) {
		return fmt.Errorf("splice(2) from an accelerated socket returned %q (%v), want %q", buf, err, msg)
	}
	return nil
}

func roundTrip(w, r *net.TCPConn, msg []byte) error {
	if _, err := w.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(r, buf); err != nil {
		return err
	}
	if !bytes.Equal(buf, msg) {
		return fmt.Errorf("got %q, want %q", buf, msg)
	}
	return nil
}
