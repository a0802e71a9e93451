package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/nodemesh/nodemesh/agent/inpod"
	"github.com/nodemesh/nodemesh/identity"
	"github.com/nodemesh/nodemesh/lab"
)

// Attacks on an enrolled pod's HBONE port (15008) from another pod, for
// TestLabAdversarial: the attacker dials from inside a pod's network
// namespace, as any pod can, with whatever certificate it has.

// svidFor obtains an SVID for id from the CA as node's agent does (its
// pod-bound token, from the node's namespace): the credentials a
// compromised node, or a pod that stole them, would hold.
func svidFor(t *testing.T, ctx context.Context, l *lab.Lab, node lab.Node, caHost, id string) tls.Certificate {
	t.Helper()
	code, body, key := signAs(t, ctx, l, node, caHost, id)
	if code != 200 {
		t.Fatalf("SVID for %s: %d %s", id, code, body)
	}
	var resp identity.SignResponse
	if err := json.Unmarshal([]byte(body), &resp); err != nil {
		t.Fatalf("SVID for %s: %v", id, err)
	}
	return tls.Certificate{Certificate: resp.Chain, PrivateKey: key}
}

// forgedCert is a certificate for the SPIFFE ID id signed by a root of the
// attacker's own.
func forgedCert(t *testing.T, id string) tls.Certificate {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "attacker root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	u, _ := url.Parse(id)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}
}

// h2conn is a raw HTTP/2 client connection to a tunnel port, for sending
// what no well-behaved client sends.
type h2conn struct {
	c   net.Conn
	fr  *http2.Framer
	buf bytes.Buffer
	enc *hpack.Encoder
}

// dialTunnel opens TLS (with cert, if any) and the HTTP/2 preface to addr
// from inside the network namespace netns. It fails when the handshake
// fails or the server does not answer the preface with its SETTINGS
// (TLS 1.3 reports a refused client certificate only at the first read).
func dialTunnel(ctx context.Context, netns, addr string, cert *tls.Certificate) (*h2conn, error) {
	d := inpod.Dialer{Netns: netns}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13} // the attacker does not check the server
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	c := tls.Client(raw, cfg)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	h := &h2conn{c: c, fr: http2.NewFramer(c, c)}
	h.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	h.enc = hpack.NewEncoder(&h.buf)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		c.Close()
		return nil, err
	}
	if err := h.fr.WriteSettings(); err != nil {
		c.Close()
		return nil, err
	}
	f, err := h.fr.ReadFrame()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("first frame: %w", err)
	}
	if _, ok := f.(*http2.SettingsFrame); !ok {
		c.Close()
		return nil, fmt.Errorf("first frame %v, want SETTINGS", f.Header())
	}
	h.fr.WriteSettingsAck()
	c.SetDeadline(time.Time{})
	return h, nil
}

func (h *h2conn) Close() error { return h.c.Close() }

// block encodes a CONNECT request header block for authority, with extra
// header fields.
func (h *h2conn) block(authority string, extra ...hpack.HeaderField) []byte {
	h.buf.Reset()
	h.enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	h.enc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
	for _, f := range extra {
		h.enc.WriteField(f)
	}
	return bytes.Clone(h.buf.Bytes())
}

// connect sends a CONNECT for authority on stream id and returns the
// response status ("200", "400", ...), "rst:<code>" for a reset stream, or
// the error that ended the connection.
func (h *h2conn) connect(id uint32, authority string) string {
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.block(authority), EndHeaders: true}); err != nil {
		return "write: " + err.Error()
	}
	h.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer h.c.SetReadDeadline(time.Time{})
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			return "read: " + err.Error()
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if f.StreamID == id {
				return f.PseudoValue("status")
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return "rst:" + f.ErrCode.String()
			}
		case *http2.GoAwayFrame:
			return "goaway:" + f.ErrCode.String()
		case *http2.PingFrame:
			if !f.IsAck() {
				h.fr.WritePing(true, f.Data)
			}
		}
	}
}

// drain reads until the server closes the connection (or d passes) and
// returns the GOAWAY code it sent, if any, and whether it closed.
func (h *h2conn) drain(d time.Duration) (goaway string, closed bool) {
	h.c.SetReadDeadline(time.Now().Add(d))
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			var ne net.Error
			return goaway, !(errors.As(err, &ne) && ne.Timeout())
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			goaway = g.ErrCode.String()
		}
	}
}

// tunnelMetrics reads node's counters of inbound tunnel limits and
// handshakes: limit label (or "handshake_<result>") -> value.
func tunnelMetrics(t *testing.T, node lab.Node) map[string]float64 {
	t.Helper()
	_, body, err := httpGet(nodeClient(node), "http://127.0.0.1:15020/metrics")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for line := range strings.Lines(body) {
		line = strings.TrimSpace(line)
		for prefix, key := range map[string]string{
			`nodemesh_tunnel_limit_hits_total{limit="`:                       "",
			`nodemesh_tunnel_server_handshakes_total{result="`:               "handshake_",
			`nodemesh_connections_denied_total{direction="inbound",reason="`: "denied_",
			`nodemesh_tunnel_cert_expiry_drains_total{side="`:                "expiry_drains_",
		} {
			rest, ok := strings.CutPrefix(line, prefix)
			if !ok {
				continue
			}
			label, val, _ := strings.Cut(rest, `"} `)
			v, err := strconv.ParseFloat(val, 64)
			if err == nil {
				out[key+label] += v
			}
		}
	}
	return out
}

// fakeTunnel is a malicious HBONE server: it completes mTLS with cert and
// answers every CONNECT as mode says ("data-before-200": response bytes
// before the response headers; "huge-headers": a 1 MiB response header
// block). It reports what the client did (reset codes, GOAWAY, close) on
// events. stop closes the listener and every connection and waits.
func fakeTunnel(ln net.Listener, cert tls.Certificate, mode, marker string, events chan<- string) (stop func()) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { serveFake(c, cert, mode, marker, events) })
		}
	})
	return func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}
}

func serveFake(c net.Conn, cert tls.Certificate, mode, marker string, events chan<- string) {
	defer c.Close()
	tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert,
		NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13})
	tc.SetDeadline(time.Now().Add(20 * time.Second))
	if err := tc.Handshake(); err != nil {
		events <- "handshake: " + err.Error()
		return
	}
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(tc, preface); err != nil {
		events <- "preface: " + err.Error()
		return
	}
	fr := http2.NewFramer(tc, tc)
	fr.ReadMetaHeaders = hpack.NewDecoder(64<<10, nil)
	fr.WriteSettings()
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			events <- "closed"
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		case *http2.RSTStreamFrame:
			events <- "rst:" + f.ErrCode.String()
		case *http2.GoAwayFrame:
			events <- "goaway:" + f.ErrCode.String()
		case *http2.MetaHeadersFrame:
			events <- "connect " + f.PseudoValue("authority")
			buf.Reset()
			enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
			switch mode {
			case "data-before-200":
				fr.WriteData(f.StreamID, false, []byte(marker))
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: buf.Bytes(), EndHeaders: true})
				fr.WriteData(f.StreamID, false, []byte(marker))
			case "huge-headers":
				enc.WriteField(hpack.HeaderField{Name: "x-big", Value: strings.Repeat(marker, (1<<20)/len(marker))})
				blk := buf.Bytes()
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: blk[:16<<10]})
				for rest := blk[16<<10:]; len(rest) > 0; {
					n := min(len(rest), 16<<10)
					if fr.WriteContinuation(f.StreamID, n == len(rest), rest[:n]) != nil {
						break
					}
					rest = rest[n:]
				}
			}
		}
	}
}

func firstN(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
