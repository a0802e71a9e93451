package cni

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeEnroller answers as told and records what it got.
type fakeEnroller struct {
	mu      sync.Mutex
	result  string
	reason  string
	err     error
	block   bool // wait for ctx
	got     []Sandbox
	forgot  []string
	inodeOK bool
}

func (f *fakeEnroller) EnrollPod(ctx context.Context, sb Sandbox) (string, string, error) {
	defer sb.Netns.Close()
	var st unix.Stat_t
	ok := unix.Fstat(int(sb.Netns.Fd()), &st) == nil
	f.mu.Lock()
	f.got = append(f.got, sb)
	f.inodeOK = ok
	f.mu.Unlock()
	if f.block {
		<-ctx.Done()
		return "", "", ctx.Err()
	}
	return f.result, f.reason, f.err
}

func (f *fakeEnroller) Forget(uid, ns, name, containerID string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.forgot = append(f.forgot, ns+"/"+name+"@"+containerID)
}

// serve starts a Server for the test's own uid and returns its socket.
func serve(t *testing.T, e Enroller, timeout time.Duration) string {
	t.Helper()
	uid := uint32(os.Getuid())
	path := filepath.Join(t.TempDir(), "run", "cni.sock")
	s, err := NewServer(ServerConfig{Path: path, Enroller: e, AllowUID: &uid, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := s.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket %s left behind after Serve returned (err %v)", path, err)
		}
	})
	return path
}

func ownNetns(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Skipf("no /proc/self/ns/net: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func addReq() Request {
	return Request{Command: CommandAdd, Namespace: "shop", Name: "web-0", UID: "u-1", ContainerID: "c1",
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.7")}}
}

func TestSendEnrolled(t *testing.T) {
	e := &fakeEnroller{result: ResultEnrolled}
	sock := serve(t, e, time.Second)
	st, err := os.Stat(filepath.Dir(sock))
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v (err %v), want 0700", st.Mode().Perm(), err)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (err %v), want 0600", st.Mode().Perm(), err)
	}
	rep, err := Send(context.Background(), sock, addReq(), ownNetns(t))
	if err != nil || rep.Result != ResultEnrolled || rep.Error != "" {
		t.Fatalf("Send = %+v, %v", rep, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.got) != 1 || e.got[0].Pod() != "shop/web-0" || e.got[0].UID != "u-1" || len(e.got[0].IPs) != 1 || !e.inodeOK {
		t.Fatalf("enroller got %+v (descriptor usable: %v)", e.got, e.inodeOK)
	}
}

func TestSendSkippedAndError(t *testing.T) {
	e := &fakeEnroller{result: ResultSkipped, reason: "not in the mesh"}
	sock := serve(t, e, time.Second)
	rep, err := Send(context.Background(), sock, addReq(), ownNetns(t))
	if err != nil || rep.Result != ResultSkipped || rep.Reason != "not in the mesh" {
		t.Fatalf("Send = %+v, %v", rep, err)
	}
	e.mu.Lock()
	e.result, e.err = "", errors.New("capture failed")
	e.mu.Unlock()
	rep, err = Send(context.Background(), sock, addReq(), ownNetns(t))
	if err != nil || rep.Error != "capture failed" {
		t.Fatalf("Send = %+v, %v", rep, err)
	}
}

func TestSendAgentDown(t *testing.T) {
	_, err := Send(context.Background(), filepath.Join(t.TempDir(), "none.sock"), addReq(), ownNetns(t))
	if !errors.Is(err, ErrAgentUnreachable) {
		t.Fatalf("Send to no agent: %v, want ErrAgentUnreachable", err)
	}
}

func TestServerTimeout(t *testing.T) {
	e := &fakeEnroller{block: true}
	sock := serve(t, e, 100*time.Millisecond)
	rep, err := Send(context.Background(), sock, addReq(), ownNetns(t))
	if err != nil || !strings.Contains(rep.Error, "deadline") {
		t.Fatalf("Send = %+v, %v; want a deadline error in the reply", rep, err)
	}
}

func TestSendClientDeadline(t *testing.T) {
	e := &fakeEnroller{block: true}
	sock := serve(t, e, 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := Send(ctx, sock, addReq(), ownNetns(t)); err == nil || !strings.Contains(err.Error(), "deadline") {
		t.Fatalf("Send past its deadline: %v", err)
	}
}

func TestDel(t *testing.T) {
	e := &fakeEnroller{}
	sock := serve(t, e, time.Second)
	rep, err := Send(context.Background(), sock, Request{Command: CommandDel, Namespace: "shop", Name: "web-0", ContainerID: "c1"}, nil)
	if err != nil || rep.Result != ResultForgotten {
		t.Fatalf("DEL = %+v, %v", rep, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.forgot) != 1 || e.forgot[0] != "shop/web-0@c1" || len(e.got) != 0 {
		t.Fatalf("forgot %v, enrolled %v", e.forgot, e.got)
	}
}

// raw sends body with the descriptors fds and returns the reply.
func raw(t *testing.T, sock string, body []byte, fds ...int) Reply {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := uc.WriteMsgUnix(body, oob, nil); err != nil {
		t.Fatal(err)
	}
	_ = uc.CloseWrite()
	var rep Reply
	if err := json.NewDecoder(uc).Decode(&rep); err != nil {
		t.Fatalf("reading the reply: %v", err)
	}
	return rep
}

func TestServerRefusesBadRequests(t *testing.T) {
	e := &fakeEnroller{result: ResultEnrolled}
	sock := serve(t, e, time.Second)
	ns := ownNetns(t)
	good, _ := json.Marshal(addReq())
	regular, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	defer regular.Close()
	mnt, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	defer mnt.Close()
	run := addReq()
	run.Command = "RUN"
	badCmd, _ := json.Marshal(run)
	badIP := addReq()
	badIP.IPs = []netip.Addr{netip.IPv4Unspecified()}
	badIPBody, _ := json.Marshal(badIP)
	for _, tc := range []struct {
		name string
		body []byte
		fds  []int
		want string
	}{
		{"not JSON", []byte("{ADD"), []int{int(ns.Fd())}, "decoding the request"},
		{"empty", nil, nil, "decoding the request"},
		{"unknown command", badCmd, []int{int(ns.Fd())}, `command "RUN"`},
		{"unspecified address", badIPBody, []int{int(ns.Fd())}, "not usable"},
		{"no namespace", good, nil, "without its network namespace"},
		{"two descriptors", good, []int{int(ns.Fd()), int(ns.Fd())}, "want one"},
		{"a regular file", good, []int{int(regular.Fd())}, "not a namespace"},
		{"a mount namespace", good, []int{int(mnt.Fd())}, "not a network namespace"},
		{"too long", []byte(`{"command":"ADD","name":"` + strings.Repeat("x", MaxMessage) + `"}`), nil, "longer than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep := raw(t, sock, tc.body, tc.fds...)
			if !strings.Contains(rep.Error, tc.want) || rep.Result != "" {
				t.Fatalf("reply %+v, want an error with %q", rep, tc.want)
			}
		})
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.got) != 0 {
		t.Fatalf("the enroller was called for a refused request: %+v", e.got)
	}
}

func TestServerRefusesOtherUsers(t *testing.T) {
	other := uint32(os.Getuid() + 1)
	path := filepath.Join(t.TempDir(), "cni.sock")
	s, err := NewServer(ServerConfig{Path: path, Enroller: &fakeEnroller{result: ResultEnrolled}, AllowUID: &other})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := s.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()
	rep, err := Send(context.Background(), path, addReq(), ownNetns(t))
	if err != nil || !strings.Contains(rep.Error, "only uid") {
		t.Fatalf("Send as another uid = %+v, %v", rep, err)
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cni.sock")
	if err := os.WriteFile(path, []byte("left by a crashed agent"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(ServerConfig{Path: path, Enroller: &fakeEnroller{}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := s.Listen()
	if err != nil {
		t.Fatalf("Listen over a stale file: %v", err)
	}
	ln.Close()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

func TestNewServerChecksConfig(t *testing.T) {
	if _, err := NewServer(ServerConfig{Path: "rel.sock", Enroller: &fakeEnroller{}}); err == nil {
		t.Error("relative path accepted")
	}
	if _, err := NewServer(ServerConfig{Path: "/run/x.sock"}); err == nil {
		t.Error("no enroller accepted")
	}
}

func FuzzRequest(f *testing.F) {
	good, _ := json.Marshal(addReq())
	f.Add(good)
	f.Add([]byte(`{"command":"DEL","namespace":"a","name":"b","containerId":"c"}`))
	f.Add([]byte(`{"command":"ADD","ips":["::"]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Request
		if json.Unmarshal(b, &r) != nil {
			return
		}
		_ = r.Validate()
	})
}
