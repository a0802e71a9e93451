package hbone

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestReadPathNeverStalls feeds a TLS stream of HTTP/2 frames of random
// sizes to the read side (batchConn, frameBuf, the Framer) in random
// chunks, as the read loop's callback does, and checks after every chunk
// that every frame whose TLS records have all arrived was read. A frame
// left behind while its bytes sit in crypto/tls would wait for data that
// may never come: the read loop skips asking crypto/tls when batchConn's
// record count says it holds nothing whole.
func TestReadPathNeverStalls(t *testing.T) {
	for seed := range uint64(20) {
		rng := mrand.New(mrand.NewPCG(seed, 7))
		cliRaw, srvRaw := net.Pipe()
		cc := &captureConn{Conn: cliRaw}
		cert := selfSigned(t)
		cli := tls.Client(cc, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
		bc := newBatchConn(srvRaw)
		srv := tls.Server(bc, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13, SessionTicketsDisabled: true})
		errc := make(chan error, 1)
		go func() { errc <- cli.Handshake() }()
		if err := srv.Handshake(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		cliRaw.Close()

		// The client writes frames of random sizes; the test keeps the
		// ciphertext and where each frame's last record ends in it.
		const nFrames = 200
		var payloads [][]byte
		var frameEnds []int
		cc.capture = true
		fw := http2.NewFramer(cli, nil)
		for i := range nFrames {
			size := rng.IntN(100)
			if rng.IntN(8) == 0 {
				size = rng.IntN(DefaultMaxFrameSize + 1)
			}
			p := make([]byte, size)
			for j := range p {
				p[j] = byte(i + j)
			}
			payloads = append(payloads, p)
			if err := fw.WriteData(uint32(1+2*(i%5)), false, p); err != nil {
				t.Fatal(err)
			}
			frameEnds = append(frameEnds, cc.buf.Len())
		}
		ct := cc.buf.Bytes()

		// The read side, in the callback's mode.
		fb := frameBuf{src: srv, bc: bc, max: DefaultMaxFrameSize}
		fr := http2.NewFramer(nil, &fb)
		fr.SetMaxReadFrameSize(DefaultMaxFrameSize)
		bc.evented = true
		got := 0
		for fed := 0; fed < len(ct); {
			chunk := min(len(ct)-fed, 1+rng.IntN(40000))
			space := bc.readSpace()
			chunk = min(chunk, len(space))
			copy(space, ct[fed:fed+chunk])
			*bc.in = (*bc.in)[:len(*bc.in)+chunk]
			fed += chunk
			for {
				if err := fb.fill(); err == errWouldBlock {
					break
				} else if err != nil {
					t.Fatalf("seed %d: fill: %v", seed, err)
				}
				f, err := fr.ReadFrame()
				if err != nil {
					t.Fatalf("seed %d: ReadFrame: %v", seed, err)
				}
				df, ok := f.(*http2.DataFrame)
				if !ok || !bytes.Equal(df.Data(), payloads[got]) {
					t.Fatalf("seed %d: frame %d: %T with %d bytes, want DATA with %d", seed, got, f, len(df.Data()), len(payloads[got]))
				}
				got++
			}
			want := 0
			for want < len(frameEnds) && frameEnds[want] <= fed {
				want++
			}
			if got != want {
				t.Fatalf("seed %d: after %d of %d bytes, read %d frames; %d are complete", seed, fed, len(ct), got, want)
			}
			bc.releaseIn()
		}
		if got != nFrames {
			t.Fatalf("seed %d: read %d frames, want %d", seed, got, nFrames)
		}
		srvRaw.Close()
	}
}

// captureConn keeps what is written to it once capture is set.
type captureConn struct {
	net.Conn
	capture bool
	buf     bytes.Buffer
}

func (c *captureConn) Write(p []byte) (int, error) {
	if c.capture {
		return c.buf.Write(p)
	}
	return c.Conn.Write(p)
}
