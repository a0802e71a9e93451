package hbone_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/nodemesh/nodemesh/agent/hbone"
	"github.com/nodemesh/nodemesh/lab/waitfor"
)

// TestPeerThatStopsReading: an authenticated client opens a tunnel, lets
// the server send into it, and then never reads its socket again while it
// keeps sending PINGs, so the server's dead-peer check (no frames for
// PingInterval) never fires. The server's blocked write must still end
// after PingTimeout, the connection close and the handler return.
func TestPeerThatStopsReading(t *testing.T) {
	e := newEnv(t)
	handlerDone := make(chan error, 1)
	h := handlerFunc(func(_ context.Context, _ *hbone.Request, tun *hbone.Tunnel) {
		if err := tun.Accept(); err != nil {
			handlerDone <- err
			return
		}
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		for {
			if _, err := tun.Write(chunk); err != nil {
				handlerDone <- err
				return
			}
		}
	})
	srv, addr := e.startServer(t, h, func(c *hbone.ServerConfig) {
		c.PingInterval = time.Hour
		c.PingTimeout = time.Second
	})

	cfg, err := e.tls.ClientTLS(e.client, e.server)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.Dial("tcp", addr.String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The preface with windows so large that only TCP can push back, and
	// one CONNECT.
	c.Write([]byte(http2.ClientPreface))
	fr := http2.NewFramer(c, c)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	fr.WriteWindowUpdate(0, 1<<31-1-65535)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "127.0.0.1:8080"})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true})
	// Read until the data flows, then stop reading and only send PINGs.
	for got := 0; got < 1<<20; {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("before the stall: %v", err)
		}
		if df, ok := f.(*http2.DataFrame); ok {
			got += len(df.Data())
		}
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if fr.WritePing(false, [8]byte{1}) != nil {
					return
				}
			}
		}
	}()
	select {
	case err := <-handlerDone:
		if err == nil {
			t.Fatal("the handler's write ended without an error")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the server is still blocked writing to a peer that stopped reading")
	}
	waitfor.True(t, 10*time.Second, "the connection to close", func() bool { return srv.Stats().Conns == 0 })
	if st := srv.Stats(); st.Timeouts == 0 {
		t.Errorf("%+v: want the stalled write counted as a timeout", st)
	}
}
