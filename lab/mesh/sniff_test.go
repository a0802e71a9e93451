package mesh

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// frame builds an Ethernet/IPv4/TCP frame.
func frame(srcPort, dstPort uint16, payload []byte) []byte {
	f := make([]byte, 14+20+20+len(payload))
	f[12], f[13] = 0x08, 0x00
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+20+len(payload)))
	ip[9] = 6
	copy(ip[12:], []byte{10, 250, 0, 1})
	copy(ip[16:], []byte{10, 250, 0, 2})
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], srcPort)
	binary.BigEndian.PutUint16(tcp[2:], dstPort)
	tcp[12] = 5 << 4
	copy(tcp[20:], payload)
	return f
}

func TestSummarise(t *testing.T) {
	marker := []byte("SECRET-MARKER")
	tls := append([]byte{23, 3, 3, 0, 40}, bytes.Repeat([]byte{0xaa}, 40)...)
	frames := []Frame{
		{Data: frame(40000, 15008, tls)},
		{Data: frame(15008, 40000, tls)},
		{Data: frame(40000, 15008, nil)},                          // bare ACK
		{Data: frame(40000, 15008, []byte("CONNECT x HTTP/1.1"))}, // HBONE but not TLS
		{Data: frame(40001, 8080, append([]byte("GET /"), marker...))},
		{Data: []byte{1, 2, 3}}, // runt
	}
	r, err := Summarise(frames, marker)
	if err != nil {
		t.Fatal(err)
	}
	want := UnderlayReport{Frames: 6, HBONE: 3, HBONEPayload: 2*len(tls) + len("CONNECT x HTTP/1.1"), TLSRecords: 2, PlainTCP: 1, MarkerFrames: 1}
	if r != want {
		t.Fatalf("Summarise = %+v, want %+v", r, want)
	}
	if _, err := Summarise(frames, nil); err == nil {
		t.Fatal("an empty marker was accepted: every capture would look clean")
	}
}

func TestParseTCPRejectsMalformed(t *testing.T) {
	good := frame(1, 2, []byte("x"))
	if seg, ok := ParseTCP(good); !ok || seg.SrcPort != 1 || seg.DstPort != 2 || string(seg.Payload) != "x" {
		t.Fatalf("ParseTCP(good) = %+v, %v", seg, ok)
	}
	for name, mut := range map[string]func([]byte){
		"not IPv4":        func(f []byte) { f[13] = 0xdd },
		"UDP":             func(f []byte) { f[14+9] = 17 },
		"short IHL":       func(f []byte) { f[14] = 0x44 },
		"total too long":  func(f []byte) { binary.BigEndian.PutUint16(f[16:], 1000) },
		"TCP offset past": func(f []byte) { f[14+20+12] = 15 << 4 },
	} {
		f := bytes.Clone(good)
		mut(f)
		if seg, ok := ParseTCP(f); ok {
			t.Errorf("%s: parsed as %+v", name, seg)
		}
	}
	for n := range len(good) {
		ParseTCP(good[:n]) // must not panic
	}
}

func FuzzParseTCP(f *testing.F) {
	f.Add(frame(15008, 1, []byte{22, 3, 1, 0, 1, 1}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if seg, ok := ParseTCP(b); ok && len(seg.Payload) > len(b) {
			t.Fatalf("payload longer than the frame")
		}
	})
}

func TestWritePcap(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.pcap")
	at := time.Unix(1700000000, 123456000)
	if err := writePcap(path, []Frame{{At: at, Data: []byte("abc")}, {At: at, Data: []byte("de")}}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 24+16+3+16+2 {
		t.Fatalf("pcap is %d bytes", len(b))
	}
	if binary.LittleEndian.Uint32(b) != 0xa1b2c3d4 || binary.LittleEndian.Uint32(b[20:]) != 1 {
		t.Fatalf("bad pcap header % x", b[:24])
	}
	if binary.LittleEndian.Uint32(b[24:]) != 1700000000 || binary.LittleEndian.Uint32(b[28:]) != 123456 || binary.LittleEndian.Uint32(b[32:]) != 3 || string(b[40:43]) != "abc" {
		t.Fatalf("bad first record % x", b[24:43])
	}
}

func TestFindBinaries(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "a")
	plain := filepath.Join(dir, "b")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(plain, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if a, c, err := FindBinaries(exe, exe); err != nil || a != exe || c != exe {
		t.Fatalf("FindBinaries(exe, exe) = %q, %q, %v", a, c, err)
	}
	if _, _, err := FindBinaries(exe, plain); err == nil {
		t.Error("a non-executable CA binary was accepted")
	}
	if _, _, err := FindBinaries(filepath.Join(dir, "missing"), exe); err == nil {
		t.Error("a missing agent binary was accepted")
	}
}
