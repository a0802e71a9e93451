package redirect

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// helperOwner is the capture owner run as a child process, so a test can
// SIGKILL it: it loads capture, enrolls one pod, plays the agent, and
// prints "READY" once it serves.
func helperOwner() {
	var ips []netip.Addr
	for _, s := range strings.Fields(os.Getenv("NMTCAP_IPS")) {
		ips = append(ips, netip.MustParseAddr(s))
	}
	ctx := context.Background()
	c, err := Load(ctx, Config{CgroupRoot: os.Getenv("NMTCAP_ROOT"), AgentCgroup: os.Getenv("NMTCAP_AGENTCG"), PinDir: os.Getenv("NMTCAP_PIN")})
	if err != nil {
		fmt.Println("ERROR", err)
		return
	}
	ep, err := c.Enroll(ctx, Pod{Name: "owned", Netns: os.Getenv("NMTCAP_NETNS"), IPs: ips})
	if err != nil {
		fmt.Println("ERROR", err)
		return
	}
	agentServeNoCleanup(c, ep)
	fmt.Println("READY", ep.Cookie)
	select {}
}

type loopResult struct {
	Captured, Direct, Failed int
	Other                    []string
}

// helperDialLoop dials NMTCAP_ADDR until stdin closes and counts how each
// attempt ended: answered by the agent, answered by the server directly,
// or failed (refused).
func helperDialLoop() {
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	var r loopResult
	for {
		select {
		case <-done:
			json.NewEncoder(os.Stdout).Encode(r)
			return
		default:
		}
		c, err := net.DialTimeout("tcp", os.Getenv("NMTCAP_ADDR"), 2*time.Second)
		if err != nil {
			r.Failed++
			time.Sleep(2 * time.Millisecond)
			continue
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		fmt.Fprintln(c, "loop")
		line, _ := bufio.NewReader(c).ReadString('\n')
		c.Close()
		switch {
		case strings.HasPrefix(line, "AGENT"):
			r.Captured++
		case strings.HasPrefix(line, "SERVER"):
			r.Direct++
		case line == "":
			r.Failed++
		default:
			if len(r.Other) < 5 {
				r.Other = append(r.Other, line)
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// helperBulk sends NMTCAP_SIZE pseudo-random bytes to NMTCAP_ADDR in
// writes of random sizes, half-closes, and checks the SHA-256 the agent's
// sink answers with.
func helperBulk() {
	size, _ := strconv.Atoi(os.Getenv("NMTCAP_SIZE"))
	var r dialResult
	defer func() { json.NewEncoder(os.Stdout).Encode(r) }()
	c, err := net.DialTimeout("tcp", os.Getenv("NMTCAP_ADDR"), 5*time.Second)
	if err != nil {
		r.Err = err.Error()
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, size)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	for off := 0; off < size; {
		n := min(size-off, 1+rng.IntN(70000))
		if _, err := c.Write(buf[off : off+n]); err != nil {
			r.Err = err.Error()
			return
		}
		off += n
	}
	c.(*net.TCPConn).CloseWrite()
	line, _ := bufio.NewReader(c).ReadString('\n')
	want := fmt.Sprintf("%x", sha256.Sum256(buf))
	r.Reply = strings.TrimSpace(line)
	if r.Reply != want {
		r.Err = fmt.Sprintf("sink hash %q, want %q", r.Reply, want)
	}
}

func jsonUnmarshal(s string, v any) error {
	if err := json.Unmarshal([]byte(s), v); err != nil {
		return fmt.Errorf("helper output %q: %w", s, err)
	}
	return nil
}
