package l7

import (
	"io"
	"net"
	"testing"
	"time"
)

func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name   string
		chunks []string // written with pauses the reader must wait through
		close  bool     // the client closes after writing
		want   Protocol
	}{
		{"http/1.1 in pieces", []string{"GE", "T /x HT", "TP/1.1\r\nHost: a\r\n\r\n"}, false, HTTP1},
		{"h2c preface", []string{H2Preface[:10], H2Preface[10:]}, false, H2C},
		{"tls", []string{"\x16\x03\x01\x00\xa5"}, false, TCP},
		{"server-first: nothing sent", nil, false, TCP},
		{"client closes after a partial line", []string{"GET /"}, true, TCP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer server.Close()
			go func() {
				for _, c := range tc.chunks {
					if _, err := client.Write([]byte(c)); err != nil {
						return
					}
				}
				if tc.close {
					client.Close()
				}
			}()
			defer client.Close()
			timeout := 5 * time.Second
			if tc.chunks == nil {
				timeout = 50 * time.Millisecond // the wait is the point; its length is not asserted
			}
			p, prefix, err := Detect(server, timeout)
			if p != tc.want {
				t.Fatalf("Detect = %v (prefix %q, err %v), want %v", p, prefix, err, tc.want)
			}
			sent := ""
			for _, c := range tc.chunks {
				sent += c
			}
			if len(prefix) > len(sent) || string(prefix) != sent[:len(prefix)] {
				t.Fatalf("prefix %q is not a prefix of what was sent (%q)", prefix, sent)
			}
			// The deadline is cleared and the bytes replay in order.
			if !tc.close && len(tc.chunks) > 0 {
				go func() { client.Write([]byte("!")) }()
				rest := make([]byte, len(sent)-len(prefix)+1)
				r := Replay(server, prefix)
				got := make([]byte, len(prefix))
				if _, err := io.ReadFull(r, got); err != nil || string(got) != string(prefix) {
					t.Fatalf("replay: %q, %v", got, err)
				}
				if _, err := io.ReadFull(r, rest); err != nil {
					t.Fatalf("reading after the replay: %v", err)
				}
				if string(rest) != sent[len(prefix):]+"!" {
					t.Fatalf("after the replay: %q, want %q", rest, sent[len(prefix):]+"!")
				}
			}
		})
	}
}
