package mesh

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/nodemesh/nodemesh/agent/l7/route"
)

// Mirroring (the RequestMirror filter) is fire and forget, and bounded so
// that a slow or dead mirror costs the client nothing and cannot pin the
// agent's memory or goroutines:
//
//   - at most Config.MaxMirrors copies are in flight in the agent; a copy
//     beyond that is dropped, never queued;
//   - each copy ends within Config.MirrorTimeout, and with the agent;
//   - a copy is sent only once the client's body has been read to its end
//     by the primary request, and only if it was at most maxMirrorBody
//     bytes (the primary is never delayed or buffered for a mirror);
//   - the mirror's response is read up to maxMirrorBody and discarded.
const (
	DefaultMaxMirrors    = 64
	DefaultMirrorTimeout = 10 * time.Second
	maxMirrorBody        = 64 << 10
)

// mirrorCopy is a request to mirror: what the primary request looked like
// when the mirror's filter applied.
type mirrorCopy struct {
	m          *route.Mirror
	method     string
	url        url.URL
	host       string
	header     http.Header
	protoMajor int
}

// sampleMirrors appends to into a copy of r for each mirror that samples
// this request.
func (out *outbound) sampleMirrors(r *http.Request, ms []*route.Mirror, into []*mirrorCopy) []*mirrorCopy {
	for _, m := range ms {
		if !m.Sample(rand.IntN) {
			continue
		}
		if r.Method == http.MethodConnect || r.Header.Get("Upgrade") != "" {
			// An upgraded connection's bytes cannot be copied as a request.
			continue
		}
		into = append(into, &mirrorCopy{m: m, method: r.Method, url: *r.URL, host: r.Host,
			header: mirrorHeader(r.Header), protoMajor: r.ProtoMajor})
	}
	return into
}

// mirror arranges for the copies to be sent: at once for a request without
// a body, else when the primary request has read the body to its end.
func (out *outbound) mirror(r *http.Request, copies []*mirrorCopy) {
	if len(copies) == 0 {
		return
	}
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		for _, c := range copies {
			out.sendMirror(c, nil)
		}
		return
	}
	r.Body = &teeBody{ReadCloser: r.Body, limit: maxMirrorBody, done: func(body []byte, err error) {
		for _, c := range copies {
			if err != nil {
				out.l.mirrorsDropped.Add(1)
				out.log.Debug("request not mirrored", "mirror", c.m.Backend.Service.String(), "reason", err.Error())
				continue
			}
			out.sendMirror(c, body)
		}
	}}
}

// sendMirror starts one copy if a slot is free, else drops it. Copies
// arriving after the client's connection ended are dropped too.
func (out *outbound) sendMirror(c *mirrorCopy, body []byte) {
	l := out.l
	out.mirrorMu.Lock()
	if out.mirrorClosed {
		out.mirrorMu.Unlock()
		l.mirrorsDropped.Add(1)
		return
	}
	select {
	case l.mirrorSlots <- struct{}{}:
	default:
		out.mirrorMu.Unlock()
		l.mirrorsDropped.Add(1)
		out.log.Debug("request not mirrored: too many mirrored requests in flight", "limit", cap(l.mirrorSlots), "mirror", c.m.Backend.Service.String())
		return
	}
	if out.mirrorUp == nil {
		out.mirrorUp = newUpstream(out.dial)
	}
	up := out.mirrorUp
	out.mirrors.Add(1)
	out.mirrorMu.Unlock()
	go func() {
		defer out.mirrors.Done()
		defer func() { <-l.mirrorSlots }()
		ctx, cancel := context.WithTimeout(out.o.Ctx, l.cfg.MirrorTimeout)
		defer cancel()
		send := out.mirrorSend
		if send == nil {
			send = out.roundTripMirror
		}
		if err := send(ctx, up, c, body); err != nil {
			out.log.Debug("mirrored request failed", "mirror", c.m.Backend.Service.String(), "error", err)
		}
	}()
}

// closeMirrors stops new copies, waits for those in flight (each ends
// within Config.MirrorTimeout) and closes their connections.
func (out *outbound) closeMirrors() {
	out.mirrorMu.Lock()
	out.mirrorClosed = true
	up := out.mirrorUp
	out.mirrorMu.Unlock()
	out.mirrors.Wait()
	if up != nil {
		up.close()
	}
}

// roundTripMirror sends c to one endpoint of the mirror's Service and
// discards the answer.
func (out *outbound) roundTripMirror(ctx context.Context, up *upstream, c *mirrorCopy, body []byte) error {
	dest, err := out.resolveBackend(c.m.Backend)
	if err != nil {
		return err
	}
	ep, release := out.o.Pick(dest.Endpoints)
	defer release()
	ctx = context.WithValue(ctx, endpointKey{}, endpointFor{service: c.m.Backend.Service.String(), ep: ep})
	u := c.url
	u.Scheme, u.Host = "http", ep.Addr.String()
	req, err := http.NewRequestWithContext(ctx, c.method, u.String(), bytes.NewReader(body))
	if err != nil {
		return err
	}
	if body == nil {
		req.Body, req.ContentLength = http.NoBody, 0
	}
	req.Host, req.Header = c.host, c.header
	resp, err := up.transport(c.protoMajor).RoundTrip(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxMirrorBody))
	return resp.Body.Close()
}

// mirrorHeader copies h without the hop-by-hop headers (RFC 9110 7.6.1),
// which belong to the client's connection, not to the copy.
func mirrorHeader(h http.Header) http.Header {
	c := h.Clone()
	for _, v := range c["Connection"] {
		for _, name := range strings.Split(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				c.Del(name)
			}
		}
	}
	for _, k := range []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
		"Transfer-Encoding", "Upgrade", "Trailer", "Content-Length"} {
		delete(c, k)
	}
	if te := c.Get("Te"); te != "" && !strings.EqualFold(te, "trailers") {
		delete(c, "Te")
	}
	return c
}

// Why a copy of the body cannot be mirrored.
var (
	errMirrorBody     = errors.New("the body is larger than the 64 KiB a mirror copies")
	errBodyUnfinished = errors.New("the primary request did not read the body to its end")
)

// teeBody passes the client's body to the primary request and keeps a copy
// of up to limit bytes; done is called once, when the body has been read
// to its end (err nil: the copy is whole), or with why there is no copy.
// Read and Close may be called from different goroutines (the transport
// closes a body it stops writing).
type teeBody struct {
	io.ReadCloser
	limit int
	done  func(body []byte, err error)

	mu   sync.Mutex
	buf  []byte
	over bool
	once sync.Once
}

func (t *teeBody) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	t.mu.Lock()
	if n > 0 && !t.over {
		if len(t.buf)+n > t.limit {
			t.over, t.buf = true, nil
		} else {
			t.buf = append(t.buf, p[:n]...)
		}
	}
	over, buf := t.over, t.buf
	t.mu.Unlock()
	switch {
	case err == io.EOF && over:
		t.finish(nil, errMirrorBody)
	case err == io.EOF:
		t.finish(buf, nil)
	case err != nil:
		t.finish(nil, errBodyUnfinished)
	}
	return n, err
}

func (t *teeBody) Close() error {
	t.finish(nil, errBodyUnfinished) // nothing when the end was read
	return t.ReadCloser.Close()
}

func (t *teeBody) finish(body []byte, err error) {
	t.once.Do(func() { t.done(body, err) })
}
