package main

import (
	"bytes"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sniffer records every frame on an interface of the root network
// namespace with an AF_PACKET socket, like tcpdump would.
type sniffer struct {
	fd     int
	mu     sync.Mutex
	frames [][]byte
	done   chan struct{}
	stopFn func()
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func sniff(t *testing.T, ifname string) *sniffer {
	t.Helper()
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		t.Fatalf("sniffing %s: %v", ifname, err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatalf("opening an AF_PACKET socket: %v", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		t.Fatalf("binding the AF_PACKET socket to %s: %v", ifname, err)
	}
	// A receive timeout lets the reader notice stop.
	tv := unix.NsecToTimeval((200 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	s := &sniffer{fd: fd, done: make(chan struct{})}
	stop := make(chan struct{})
	go func() {
		defer close(s.done)
		buf := make([]byte, 65536)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil || n <= 0 {
				continue
			}
			s.mu.Lock()
			s.frames = append(s.frames, bytes.Clone(buf[:n]))
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-s.done
		unix.Close(fd)
	})
	s.stopFn = func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-s.done
	}
	return s
}

// stop ends the capture and returns the frames.
func (s *sniffer) stop() [][]byte {
	s.stopFn()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.frames
}

func contains(frames [][]byte, marker []byte) bool {
	for _, f := range frames {
		if bytes.Contains(f, marker) {
			return true
		}
	}
	return false
}

// tcpPortSeen reports whether a captured IPv4 TCP frame has port as source
// or destination.
func tcpPortSeen(frames [][]byte, port uint16) bool {
	for _, f := range frames {
		if len(f) < 14+20+4 || f[12] != 0x08 || f[13] != 0x00 || f[14+9] != 6 {
			continue
		}
		ihl := int(f[14]&0x0f) * 4
		if len(f) < 14+ihl+4 {
			continue
		}
		tcp := f[14+ihl:]
		src, dst := uint16(tcp[0])<<8|uint16(tcp[1]), uint16(tcp[2])<<8|uint16(tcp[3])
		if src == port || dst == port {
			return true
		}
	}
	return false
}

// tcp6PortSeen reports whether a captured IPv6 TCP frame (no extension
// headers) has port as source or destination.
func tcp6PortSeen(frames [][]byte, port uint16) bool {
	for _, f := range frames {
		if len(f) < 14+40+4 || f[12] != 0x86 || f[13] != 0xdd || f[14+6] != 6 {
			continue
		}
		tcp := f[14+40:]
		src, dst := uint16(tcp[0])<<8|uint16(tcp[1]), uint16(tcp[2])<<8|uint16(tcp[3])
		if src == port || dst == port {
			return true
		}
	}
	return false
}
