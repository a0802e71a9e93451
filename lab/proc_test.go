package lab

import (
	"net"
	"os"
	"testing"
)

// TestListeningSeesIPv6 checks the readiness probe against this process's
// own listeners: a Go server on ":port" with network "tcp" is one
// dual-stack IPv6 socket (only in /proc/net/tcp6), as in a user's own pod
// program; a "tcp4" one is in /proc/net/tcp.
func TestListeningSeesIPv6(t *testing.T) {
	for _, network := range []string{"tcp", "tcp4", "tcp6"} {
		ln, err := net.Listen(network, ":0")
		if err != nil {
			if network == "tcp6" {
				t.Logf("no IPv6 here: %v", err)
				continue
			}
			t.Fatal(err)
		}
		port := int32(ln.Addr().(*net.TCPAddr).Port)
		ok, err := listening(os.Getpid(), port)
		if err != nil || !ok {
			t.Errorf("%s listener on %s: listening = %t, %v", network, ln.Addr(), ok, err)
		}
		ln.Close()
		if ok, _ := listening(os.Getpid(), port); ok {
			t.Errorf("%s: port %d still seen listening after close", network, port)
		}
	}
}

func TestListensOn(t *testing.T) {
	tcp6 := []byte(`  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F91 0000000000000000FFFF00000100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
`)
	for _, tt := range []struct {
		port int32
		want bool
	}{{8080, true}, {8081, false}, {80, false}} {
		if got := listensOn(tcp6, tt.port); got != tt.want {
			t.Errorf("port %d: %t, want %t", tt.port, got, tt.want)
		}
	}
	if listensOn(nil, 8080) || listensOn([]byte("header only"), 8080) {
		t.Error("an empty table listens")
	}
}
