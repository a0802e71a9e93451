package mesh

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Sniffer records every frame crossing one interface of the root network
// namespace (for the lab, a node's link on the underlay bridge) with an
// AF_PACKET socket, and writes them to a pcap file that tcpdump or
// Wireshark can read.
type Sniffer struct {
	fd     int
	ifname string
	pcap   string
	stopCh chan struct{}
	done   chan struct{}
	once   sync.Once

	mu     sync.Mutex
	frames []Frame
}

// Frame is one captured frame.
type Frame struct {
	At   time.Time
	Data []byte // from the Ethernet header on, at most 64 KiB
}

// Sniff starts capturing on ifname; Stop ends it and writes pcapPath
// (unless it is empty).
func Sniff(ifname, pcapPath string) (*Sniffer, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("sniffing %s: %w", ifname, err)
	}
	proto := htons(unix.ETH_P_ALL)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		return nil, fmt.Errorf("opening an AF_PACKET socket (needs CAP_NET_RAW): %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding the AF_PACKET socket to %s: %w", ifname, err)
	}
	// A receive timeout lets the reader notice Stop.
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting the AF_PACKET receive timeout: %w", err)
	}
	s := &Sniffer{fd: fd, ifname: ifname, pcap: pcapPath, stopCh: make(chan struct{}), done: make(chan struct{})}
	go s.read()
	return s, nil
}

func (s *Sniffer) read() {
	defer close(s.done)
	buf := make([]byte, 65536)
	for {
		select {
		case <-s.stopCh:
			return
		default:
		}
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil || n <= 0 {
			continue
		}
		s.mu.Lock()
		s.frames = append(s.frames, Frame{At: time.Now(), Data: bytes.Clone(buf[:n])})
		s.mu.Unlock()
	}
}

// Stop ends the capture, closes the socket, writes the pcap file and
// returns the frames. Calling it again returns the same frames.
func (s *Sniffer) Stop() ([]Frame, error) {
	var err error
	s.once.Do(func() {
		close(s.stopCh)
		<-s.done
		unix.Close(s.fd)
		if s.pcap != "" {
			err = writePcap(s.pcap, s.frames)
		}
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.frames, err
}

// writePcap writes frames as a classic pcap file (LINKTYPE_ETHERNET).
func writePcap(path string, frames []Frame) error {
	var b bytes.Buffer
	hdr := make([]byte, 24)
	binary.LittleEndian.PutUint32(hdr[0:], 0xa1b2c3d4)
	binary.LittleEndian.PutUint16(hdr[4:], 2)
	binary.LittleEndian.PutUint16(hdr[6:], 4)
	binary.LittleEndian.PutUint32(hdr[16:], 65536) // snaplen
	binary.LittleEndian.PutUint32(hdr[20:], 1)     // Ethernet
	b.Write(hdr)
	rec := make([]byte, 16)
	for _, f := range frames {
		binary.LittleEndian.PutUint32(rec[0:], uint32(f.At.Unix()))
		binary.LittleEndian.PutUint32(rec[4:], uint32(f.At.Nanosecond()/1000))
		binary.LittleEndian.PutUint32(rec[8:], uint32(len(f.Data)))
		binary.LittleEndian.PutUint32(rec[12:], uint32(len(f.Data)))
		b.Write(rec)
		b.Write(f.Data)
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		return fmt.Errorf("writing the capture %s: %w", path, err)
	}
	return nil
}

// TCPSegment is the part of an IPv4 TCP frame the demo looks at.
type TCPSegment struct {
	Src, Dst         net.IP
	SrcPort, DstPort uint16
	Payload          []byte
}

// ParseTCP decodes an Ethernet/IPv4/TCP frame; ok is false for anything
// else.
func ParseTCP(f []byte) (seg TCPSegment, ok bool) {
	if len(f) < 14+20 || f[12] != 0x08 || f[13] != 0x00 {
		return seg, false
	}
	ip := f[14:]
	if ip[0]>>4 != 4 || ip[9] != 6 {
		return seg, false
	}
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if ihl < 20 || total < ihl || len(ip) < total {
		return seg, false
	}
	tcp := ip[ihl:total]
	if len(tcp) < 20 {
		return seg, false
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return seg, false
	}
	return TCPSegment{
		Src: net.IP(ip[12:16]), Dst: net.IP(ip[16:20]),
		SrcPort: binary.BigEndian.Uint16(tcp[0:]), DstPort: binary.BigEndian.Uint16(tcp[2:]),
		Payload: tcp[off:],
	}, true
}

// UnderlayReport summarises a capture for the "only TLS on the wire" check.
type UnderlayReport struct {
	Frames       int // all frames
	HBONE        int // TCP segments to or from port 15008
	HBONEPayload int // of those, bytes of payload
	TLSRecords   int // HBONE segments whose payload starts with a TLS record header
	// PlainTCP counts TCP segments with payload on any other port (the
	// API server and CA traffic of the lab's node processes, for example).
	PlainTCP     int
	MarkerFrames int // frames containing the marker anywhere
}

// Summarise counts what frames show about marker and port 15008.
func Summarise(frames []Frame, marker []byte) (UnderlayReport, error) {
	if len(marker) == 0 {
		return UnderlayReport{}, errors.New("summarising a capture: empty marker")
	}
	r := UnderlayReport{Frames: len(frames)}
	for _, f := range frames {
		if bytes.Contains(f.Data, marker) {
			r.MarkerFrames++
		}
		seg, ok := ParseTCP(f.Data)
		if !ok || len(seg.Payload) == 0 {
			continue
		}
		if seg.SrcPort == 15008 || seg.DstPort == 15008 {
			r.HBONE++
			r.HBONEPayload += len(seg.Payload)
			if isTLSRecord(seg.Payload) {
				r.TLSRecords++
			}
			continue
		}
		r.PlainTCP++
	}
	return r, nil
}

// isTLSRecord reports whether p starts with a TLS record header: a known
// content type (change_cipher_spec, alert, handshake, application_data)
// and version 3.x.
func isTLSRecord(p []byte) bool {
	return len(p) >= 5 && p[0] >= 20 && p[0] <= 23 && p[1] == 3 && p[2] <= 4
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
