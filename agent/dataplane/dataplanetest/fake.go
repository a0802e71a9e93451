// Package dataplanetest has in-memory fakes of the data plane's edges, so
// agent/dataplane and its users run under -race without root: Capture
// opens loopback listeners instead of in-pod sockets and sends every
// captured outbound connection to one destination per pod; SVIDs signs
// real SVIDs with a test CA when a pod claims one.
package dataplanetest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/nodemesh/nodemesh/agent/dataplane"
	"github.com/nodemesh/nodemesh/agent/hbone/hbonetest"
	"github.com/nodemesh/nodemesh/agent/proxy"
	"github.com/nodemesh/nodemesh/redirect"
)

// Capture is a fake dataplane.Capture. Its zero value is ready to use.
type Capture struct {
	mu       sync.Mutex
	pods     map[string]*Pod // by redirect.Pod.Name
	failNext map[string]error
	failSelf map[string]error
	updates  []redirect.Pod
}

var _ dataplane.Capture = (*Capture)(nil)

// Pod is a pod the fake captured.
type Pod struct {
	Spec redirect.Pod
	// Outbound is where "captured" connections of the pod are accepted:
	// dial it to play the pod's application.
	Outbound net.Listener
	// HBONE listens on the pod's first IP (a loopback address in tests).
	HBONE net.Listener

	c   *Capture
	mu  sync.Mutex
	dst netip.AddrPort
}

// FailEnroll makes the next Enroll of the pod named name fail with err.
func (c *Capture) FailEnroll(name string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failNext == nil {
		c.failNext = make(map[string]error)
	}
	c.failNext[name] = err
}

// FailSelfCheck makes the pod's self-checks fail with err (nil: pass).
func (c *Capture) FailSelfCheck(name string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failSelf == nil {
		c.failSelf = make(map[string]error)
	}
	c.failSelf[name] = err
}

// Pod returns the captured pod named name, or nil.
func (c *Capture) Pod(name string) *Pod {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pods[name]
}

// Updates returns the pods Update was called with.
func (c *Capture) Updates() []redirect.Pod {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.updates)
}

// Enroll implements dataplane.Capture.
func (c *Capture) Enroll(_ context.Context, spec redirect.Pod) (dataplane.CapturedPod, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.failNext[spec.Name]; err != nil {
		delete(c.failNext, spec.Name)
		return nil, err
	}
	if _, ok := c.pods[spec.Name]; ok {
		return nil, fmt.Errorf("fake capture: %s enrolled twice", spec.Name)
	}
	if len(spec.IPs) == 0 {
		return nil, errors.New("fake capture: pod without IP")
	}
	out, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	hb, err := net.Listen("tcp", netip.AddrPortFrom(spec.IPs[0], 0).String())
	if err != nil {
		out.Close()
		return nil, err
	}
	p := &Pod{Spec: spec, Outbound: out, HBONE: hb, c: c}
	if c.pods == nil {
		c.pods = make(map[string]*Pod)
	}
	c.pods[spec.Name] = p
	return p, nil
}

// Update implements dataplane.Capture.
func (c *Capture) Update(_ context.Context, spec redirect.Pod) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.pods[spec.Name]
	if !ok {
		return fmt.Errorf("fake capture: updating %s, which is not enrolled", spec.Name)
	}
	p.Spec = spec
	c.updates = append(c.updates, spec)
	return nil
}

// Unenroll implements dataplane.Capture.
func (c *Capture) Unenroll(cp dataplane.CapturedPod) error {
	p, ok := cp.(*Pod)
	if !ok {
		return fmt.Errorf("fake capture: unenrolling %T", cp)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pods[p.Spec.Name] != p {
		return fmt.Errorf("fake capture: %s is not enrolled", p.Spec.Name)
	}
	delete(c.pods, p.Spec.Name)
	p.Outbound.Close()
	p.HBONE.Close()
	return nil
}

// Dialer implements dataplane.Capture: a plain dialer (no namespaces).
func (c *Capture) Dialer(string) proxy.Dialer { return &net.Dialer{} }

// SetDst sets where the pod's captured outbound connections were going.
func (p *Pod) SetDst(dst netip.AddrPort) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dst = dst
}

// Sockets implements dataplane.CapturedPod.
func (p *Pod) Sockets() dataplane.Sockets {
	return dataplane.Sockets{
		Outbound: []net.Listener{p.Outbound},
		HBONE:    []net.Listener{p.HBONE},
		OrigDst: func(net.Conn) (netip.AddrPort, error) {
			p.mu.Lock()
			defer p.mu.Unlock()
			if !p.dst.IsValid() {
				return netip.AddrPort{}, errors.New("fake capture: no destination set")
			}
			return p.dst, nil
		},
	}
}

// SelfCheck implements dataplane.CapturedPod.
func (p *Pod) SelfCheck(context.Context) error {
	p.c.mu.Lock()
	defer p.c.mu.Unlock()
	return p.c.failSelf[p.Spec.Name]
}

// SVIDs is a fake dataplane.SVIDs: Add signs an SVID with CA at once (no
// CA round trip), and SVIDSource fails while no owner holds the identity,
// as identity/svid.Manager does.
type SVIDs struct {
	CA *hbonetest.CA

	mu     sync.Mutex
	owners map[string]spiffeid.ID
	svids  map[spiffeid.ID]*x509svid.SVID
	fail   error
}

var _ dataplane.SVIDs = (*SVIDs)(nil)

// NewSVIDs returns SVIDs signed by ca.
func NewSVIDs(ca *hbonetest.CA) *SVIDs { return &SVIDs{CA: ca} }

// FailAdd makes Add fail with err (nil: succeed).
func (s *SVIDs) FailAdd(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail = err
}

// Add implements dataplane.SVIDs.
func (s *SVIDs) Add(owner string, id spiffeid.ID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail != nil {
		return s.fail
	}
	if s.owners == nil {
		s.owners = make(map[string]spiffeid.ID)
		s.svids = make(map[spiffeid.ID]*x509svid.SVID)
	}
	if s.svids[id] == nil {
		sv, err := s.CA.SVID(id)
		if err != nil {
			return err
		}
		s.svids[id] = sv
	}
	s.owners[owner] = id
	return nil
}

// Remove implements dataplane.SVIDs.
func (s *SVIDs) Remove(owner string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, ok := s.owners[owner]
	if !ok {
		return
	}
	delete(s.owners, owner)
	for _, other := range s.owners {
		if other == id {
			return
		}
	}
	delete(s.svids, id)
}

// Owners returns how many owners hold a claim.
func (s *SVIDs) Owners() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.owners)
}

// SVIDSource implements identity.Provider.
func (s *SVIDs) SVIDSource(id spiffeid.ID) x509svid.Source { return svidSource{s, id} }

// GetX509BundleForTrustDomain implements identity.Provider.
func (s *SVIDs) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.CA.Bundle().GetX509BundleForTrustDomain(td)
}

type svidSource struct {
	s  *SVIDs
	id spiffeid.ID
}

func (src svidSource) GetX509SVID() (*x509svid.SVID, error) {
	src.s.mu.Lock()
	defer src.s.mu.Unlock()
	if sv := src.s.svids[src.id]; sv != nil {
		return sv, nil
	}
	return nil, fmt.Errorf("fake SVIDs: no SVID held for %s", src.id)
}
