package redirect

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodemesh/nodemesh/agent/inpod"
)

// topo is a one-node test topology: a node namespace with a bridge, pod
// namespaces with a veth each, and a cgroup per pod under a capture root.
type topo struct {
	t      testing.TB
	id     string // nmtcap-<pid>-<n>
	node   string // node netns name
	root   string // capture root cgroup
	pinDir string
	pods   map[string]*testPod
	n      int
}

type testPod struct {
	name   string
	netns  string // path
	cgroup string
	ip4    netip.Addr
	ip6    netip.Addr
}

func (p *testPod) ips() []netip.Addr { return []netip.Addr{p.ip4, p.ip6} }

var topoSeq struct {
	sync.Mutex
	n int
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func newTopo(t testing.TB) *topo {
	t.Helper()
	topoSeq.Lock()
	topoSeq.n++
	seq := topoSeq.n
	topoSeq.Unlock()
	id := fmt.Sprintf("%s%d-%d", testPrefix, os.Getpid(), seq)
	mnt, err := Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	tp := &topo{t: t, id: id, node: id + "-node", root: filepath.Join(mnt, id+"-root"),
		pinDir: filepath.Join("/sys/fs/bpf", id), pods: map[string]*testPod{}}
	t.Cleanup(tp.destroy)
	if err := os.Mkdir(tp.root, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "ip", "netns", "add", tp.node)
	run(t, "ip", "-n", tp.node, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "netns", "exec", tp.node, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	run(t, "ip", "-n", tp.node, "addr", "add", "10.211.0.1/24", "dev", "br0")
	run(t, "ip", "-n", tp.node, "addr", "add", "fd00:211::1/64", "dev", "br0", "nodad")
	run(t, "ip", "-n", tp.node, "link", "set", "br0", "up")
	run(t, "ip", "-n", tp.node, "link", "set", "lo", "up")
	return tp
}

// pod adds a pod namespace with IPs 10.211.0.<n+1> and fd00:211::<n+1>.
func (tp *topo) pod(name string) *testPod {
	t := tp.t
	t.Helper()
	tp.n++
	host := fmt.Sprintf("%d", tp.n+1)
	ns := tp.id + "-" + name
	p := &testPod{name: name, netns: "/var/run/netns/" + ns, cgroup: filepath.Join(tp.root, name),
		ip4: netip.MustParseAddr("10.211.0." + host), ip6: netip.MustParseAddr("fd00:211::" + host)}
	run(t, "ip", "netns", "add", ns)
	run(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	veth := "v" + name
	run(t, "ip", "-n", tp.node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
	run(t, "ip", "-n", tp.node, "link", "set", veth, "master", "br0", "up")
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	run(t, "ip", "-n", ns, "addr", "add", p.ip4.String()+"/24", "dev", "eth0")
	run(t, "ip", "-n", ns, "addr", "add", p.ip6.String()+"/64", "dev", "eth0", "nodad")
	run(t, "ip", "-n", ns, "link", "set", "eth0", "up")
	if err := os.Mkdir(p.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	tp.pods[name] = p
	return p
}

func (tp *topo) destroy() {
	for _, p := range tp.pods {
		killCgroup(p.cgroup)
		exec.Command("ip", "netns", "del", filepath.Base(p.netns)).Run()
	}
	exec.Command("ip", "netns", "del", tp.node).Run()
	os.RemoveAll(tp.pinDir)
	removeCgroupTree(tp.root)
}

// killCgroup SIGKILLs whatever still runs in a pod cgroup (cgroup.kill).
func killCgroup(dir string) {
	b, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	for _, pid := range strings.Fields(string(b)) {
		if pid == fmt.Sprint(os.Getpid()) {
			return // never kill the test process itself (benchmarks move into pods)
		}
	}
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	for range 50 {
		b, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if len(strings.TrimSpace(string(b))) == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (tp *topo) config() Config {
	return Config{CgroupRoot: tp.root, AgentCgroup: agentCgroup, PinDir: tp.pinDir}
}

// ---- helper processes ("apps" inside a pod's netns and cgroup) ----

const helperEnv = "NMTCAP_HELPER"

// helperCmd builds a command running this test binary as a helper inside
// the pod's network namespace and cgroup (CLONE_INTO_CGROUP), so its
// sockets are the pod's sockets in every respect capture looks at.
func helperCmd(t testing.TB, p *testPod, mode string, env ...string) *exec.Cmd {
	t.Helper()
	cg, err := os.Open(p.cgroup)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.Close() })
	cmd := exec.Command("ip", "netns", "exec", filepath.Base(p.netns), os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), append([]string{helperEnv + "=" + mode}, env...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return cmd
}

type dialResult struct {
	Reply  string `json:"reply"`
	Err    string `json:"err"`
	Local  string `json:"local"`
	Remote string `json:"remote"`
}

// appDial connects from the pod (as its app would) to addr over network
// ("tcp" or "udp"), sends msg and returns the first reply line.
func appDial(t testing.TB, p *testPod, network, addr, msg string) dialResult {
	t.Helper()
	cmd := helperCmd(t, p, "dial", "NMTCAP_NET="+network, "NMTCAP_ADDR="+addr, "NMTCAP_MSG="+msg)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("app dial helper: %v (%s)", err, out)
	}
	var r dialResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("app dial helper output %q: %v", out, err)
	}
	return r
}

func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("helper process for other tests")
	}
	switch mode {
	case "dial":
		helperDial()
	case "dialmapped":
		helperDialMapped()
	case "owner":
		helperOwner()
	case "dialloop":
		helperDialLoop()
	case "bulk":
		helperBulk()
	}
	os.Exit(0)
}

func helperDial() {
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.Dial(os.Getenv("NMTCAP_NET"), os.Getenv("NMTCAP_ADDR"))
	helperTalk(c, err)
}

// helperDialMapped connects a dual-stack AF_INET6 socket to the
// v4-mapped form of an IPv4 address, as Java and other runtimes do.
func helperDialMapped() {
	ap := netip.MustParseAddrPort(os.Getenv("NMTCAP_ADDR"))
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		helperTalk(nil, err)
		return
	}
	sa := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: netip.AddrFrom16(ap.Addr().As16()).As16()}
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		helperTalk(nil, fmt.Errorf("connect [%s]:%d: %w", netip.AddrFrom16(sa.Addr), sa.Port, err))
		return
	}
	f := os.NewFile(uintptr(fd), "mapped")
	c, err := net.FileConn(f)
	f.Close()
	helperTalk(c, err)
}

func helperTalk(c net.Conn, err error) {
	var r dialResult
	defer func() { json.NewEncoder(os.Stdout).Encode(r) }()
	if err != nil {
		r.Err = err.Error()
		return
	}
	defer c.Close()
	r.Local, r.Remote = c.LocalAddr().String(), c.RemoteAddr().String()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(os.Getenv("NMTCAP_MSG") + "\n")); err != nil {
		r.Err = err.Error()
		return
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	r.Reply = strings.TrimSuffix(line, "\n")
	if err != nil {
		r.Err = err.Error()
	}
}

// exchangeLine sends msg as one line on c and returns the first line of
// the reply, with its newline trimmed, all within d.
func exchangeLine(c net.Conn, msg string, d time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(d))
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// ---- servers and an agent-like proxy in the test process ----

// serveLines serves ln: for each connection, reads a line and answers
// "<tag> local=<local> remote=<remote> msg=<line>". It counts connections.
type lineServer struct {
	tag   string
	mu    sync.Mutex
	conns int
}

func (s *lineServer) count() int { s.mu.Lock(); defer s.mu.Unlock(); return s.conns }

func serveLines(t testing.TB, ln net.Listener, tag string) *lineServer {
	s := &lineServer{tag: tag}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "%s local=%s remote=%s msg=%s\n", tag, c.LocalAddr(), c.RemoteAddr(), strings.TrimSuffix(line, "\n"))
			})
		}
	})
	return s
}

// listenIn opens a listener in a pod namespace.
func listenIn(t testing.TB, p *testPod, network, addr string) *net.TCPListener {
	t.Helper()
	ln, err := inpod.ListenTCP(context.Background(), p.netns, network, addr)
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// agentServe plays the agent for an enrolled pod: captured outbound
// connections are forwarded (with the bypass mark, from inside the pod) to
// their original destination, with "AGENT dst=<dst> | " prefixed to the
// reply; inbound connections on 15006 are answered with their local
// address, the original destination. It returns a stop function.
func agentServe(t testing.TB, c *Capture, ep *EnrolledPod) func() {
	stop := agentServeNoCleanup(c, ep)
	t.Cleanup(stop)
	return stop
}

func agentServeNoCleanup(c *Capture, ep *EnrolledPod) func() {
	var wg sync.WaitGroup
	for _, ln := range ep.Listeners.Outbound {
		wg.Go(func() {
			for {
				conn, dst, err := ep.AcceptOutbound(ln)
				if err != nil {
					return
				}
				wg.Go(func() { agentForward(c, ep, conn, dst) })
			}
		})
	}
	for _, ln := range ep.Listeners.Inbound {
		wg.Go(func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				wg.Go(func() {
					defer conn.Close()
					conn.SetDeadline(time.Now().Add(10 * time.Second))
					bufio.NewReader(conn).ReadString('\n')
					fmt.Fprintf(conn, "INBOUND local=%s remote=%s\n", conn.LocalAddr(), conn.RemoteAddr())
				})
			}
		})
	}
	for _, ln := range ep.Listeners.HBONE {
		wg.Go(func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(conn, "HBONE local=%s\n", conn.LocalAddr())
				conn.Close()
			}
		})
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			ep.Listeners.Close()
			wg.Wait()
		})
	}
}

func agentForward(c *Capture, ep *EnrolledPod, conn *net.TCPConn, dst netip.AddrPort) {
	defer conn.Close()
	if dst.Port() == sinkPort {
		agentSink(conn)
		return
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(conn)
	line, err := br.ReadString('\n')
	if err != nil {
		return
	}
	d := inpod.Dialer{Netns: ep.Netns, Mark: c.Mark()}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	up, err := d.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		fmt.Fprintf(conn, "AGENT dst=%s | dial error: %v\n", dst, err)
		return
	}
	defer up.Close()
	up.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(up, line)
	reply, _ := bufio.NewReader(up).ReadString('\n')
	fmt.Fprintf(conn, "AGENT dst=%s | %s", dst, reply)
}

// sinkPort is a destination the test agent terminates itself: it reads
// until EOF and answers with the SHA-256 of what it read, so a test can
// check payload integrity over the app<->agent leg alone.
const sinkPort = 7777

func agentSink(conn *net.TCPConn) {
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	h := sha256.New()
	if _, err := io.Copy(h, conn); err != nil {
		return
	}
	fmt.Fprintf(conn, "%x\n", h.Sum(nil))
}
