package redirect

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Ports the capture programs know (they are compiled into the C program).
const (
	PortOutbound = 15001
	PortInbound  = 15006
	PortHBONE    = 15008
	PortAdmin    = 15000
	PortMetrics  = 15020
	PortReady    = 15021
	// ProbePort is the port the capture self-check connects to on the
	// pod's own IP. It is never excluded from capture.
	ProbePort = 15099
)

// DefaultMark is the SO_MARK that exempts the agent's sockets from capture.
const DefaultMark uint32 = 0x4e4d0539

// DefaultDeliverMark is the SO_MARK of the agent's transparent sockets that
// deliver inbound connections to applications with the peer's address as
// source; the pod's policy route for it brings the replies back to the
// agent (agent/inpod.SetupTransparent). Also exempt from capture.
const DefaultDeliverMark uint32 = 0x4e4d053a

// DefaultPinDir is where the capture objects are pinned on bpffs.
const DefaultPinDir = "/sys/fs/bpf/nodemesh"

// AccelMode selects same-node acceleration (sockops + sk_msg).
type AccelMode int

const (
	// AccelAuto turns acceleration on when the start-up self-test passes.
	AccelAuto AccelMode = iota
	// AccelOff never turns it on.
	AccelOff
	// AccelForce turns it on when the self-test passes except for the
	// splice(2) check: only for nodes whose applications never read their
	// sockets with splice, and an agent that does not either.
	AccelForce
)

// Config configures Load.
type Config struct {
	// CgroupRoot is the cgroup v2 directory whose descendants are the pods
	// (the node's kubepods cgroup, or the cgroup2 root). connect4/connect6
	// and sockops are attached there once. Required.
	CgroupRoot string
	// AgentCgroup is the agent's own cgroup, where sockops is attached too
	// so that same-node acceleration sees the agent's end of captured
	// connections. Empty means the calling process's cgroup. Unused when
	// it lies inside CgroupRoot.
	AgentCgroup string
	// PinDir is a directory on bpffs for the pinned maps and links that
	// keep capture in force while the agent is down (fail closed) and let
	// a restarted agent adopt them. Empty means DefaultPinDir.
	PinDir string
	// Mark is the SO_MARK of agent sockets, which are never captured.
	// Zero means DefaultMark.
	Mark uint32
	// DeliverMark is the SO_MARK of transparent delivery sockets. Zero
	// means DefaultDeliverMark. It must differ from Mark.
	DeliverMark uint32
	// NoTransparent turns transparent delivery off: applications then see
	// their own pod's address as the source of every inbound connection.
	NoTransparent bool
	// Accel selects same-node acceleration.
	Accel AccelMode
	// Logger receives operational messages; nil discards them.
	Logger *slog.Logger
}

// Capture is the loaded and attached capture machinery of one node.
// Its methods are safe for concurrent use.
type Capture struct {
	cfg  Config
	log  *slog.Logger
	objs captureObjects

	mu       sync.Mutex
	links    map[string]link.Link // cgroup links by pin name
	skmsg    bool                 // sk_msg attached to sockhash
	pods     map[uint64]*podState // by netns cookie
	slots    map[uint32]bool      // used inbound_socks slots
	nextSlot uint32
	accel    bool
	accelOK  bool // the start-up self-test passed
	accelWhy string
	adopted  bool
	closed   bool
	// transparent delivery is possible on this kernel and configuration;
	// transparentWhy says why not.
	transparent    bool
	transparentWhy string
	deliveries     [2]atomic.Uint64 // transparent, from the pod's own address
	// Connections to a pod's outbound listener with no recorded original
	// destination (an application dialling 127.0.0.1:15001 itself): all
	// counted, logged at most once a minute (the last line's time and
	// how many were not logged since).
	noOrigDst                      atomic.Uint64
	noOrigDstLogged, noOrigDstHeld atomic.Int64
	maxSlots                       uint32
	podsDir                        string
	linksDir                       string
	mapsDir                        string
}

// ErrClosed is returned by methods of a closed or released Capture.
var ErrClosed = errors.New("capture is closed")

// Load loads the capture programs and attaches them, adopting the pinned
// maps and links of a previous agent instance when present: pinned links
// are updated in place to the new programs (BPF_LINK_UPDATE), so an
// enrolled pod's connects stay captured during the hand-over.
func Load(ctx context.Context, cfg Config) (_ *Capture, err error) {
	if cfg.CgroupRoot == "" {
		return nil, errors.New("loading capture: no cgroup root given; pass the node's pod cgroup (cgroup v2)")
	}
	if err := isCgroup2(cfg.CgroupRoot); err != nil {
		return nil, fmt.Errorf("loading capture: %w", err)
	}
	if cfg.PinDir == "" {
		cfg.PinDir = DefaultPinDir
	}
	if cfg.Mark == 0 {
		cfg.Mark = DefaultMark
	}
	if cfg.DeliverMark == 0 {
		cfg.DeliverMark = DefaultDeliverMark
	}
	if cfg.DeliverMark == cfg.Mark {
		return nil, fmt.Errorf("loading capture: the delivery mark %#x equals the capture bypass mark", cfg.Mark)
	}
	if cfg.AgentCgroup == "" {
		if cfg.AgentCgroup, err = OwnCgroup(); err != nil {
			return nil, fmt.Errorf("loading capture: %w", err)
		}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Capture{
		cfg:      cfg,
		log:      log,
		links:    map[string]link.Link{},
		pods:     map[uint64]*podState{},
		slots:    map[uint32]bool{},
		mapsDir:  filepath.Join(cfg.PinDir, "maps"),
		linksDir: filepath.Join(cfg.PinDir, "links"),
		podsDir:  filepath.Join(cfg.PinDir, "pods"),
	}
	if err := ensureBPFFS(cfg.PinDir); err != nil {
		return nil, fmt.Errorf("loading capture: %w", err)
	}
	for _, d := range []string{c.mapsDir, c.linksDir, c.podsDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("loading capture: creating pin directory: %w", err)
		}
	}
	if _, err := os.Stat(filepath.Join(c.mapsDir, captureMapEnrolled)); err == nil {
		c.adopted = true
	}

	spec, err := loadCapture()
	if err != nil {
		return nil, fmt.Errorf("loading capture: %w", err)
	}
	if err := spec.Variables[captureVarAgentMark].Set(cfg.Mark); err != nil {
		return nil, fmt.Errorf("loading capture: setting agent mark: %w", err)
	}
	if err := spec.Variables[captureVarDeliverMark].Set(cfg.DeliverMark); err != nil {
		return nil, fmt.Errorf("loading capture: setting delivery mark: %w", err)
	}
	c.maxSlots = spec.Maps[captureMapInboundSocks].MaxEntries
	c.transparent, c.transparentWhy = !cfg.NoTransparent, "disabled by configuration"
	if c.transparent {
		c.transparentWhy = "enabled"
		if err := spec.Variables[captureVarLookupIfindex].Set(uint32(1)); err != nil {
			return nil, fmt.Errorf("loading capture: %w", err)
		}
	}
	err = spec.LoadAndAssign(&c.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: c.mapsDir}})
	var ve *ebpf.VerifierError
	if c.transparent && errors.As(err, &ve) {
		// Before Linux 5.17 sk_lookup cannot tell the agent's transparent
		// deliveries (over the pod's loopback) from connections from
		// outside: load without that check, and deliver from the pod's
		// own address.
		c.transparent = false
		c.transparentWhy = "the kernel's sk_lookup lacks ingress_ifindex (needs Linux 5.17+)"
		log.Warn("transparent inbound delivery unavailable; applications will see their own pod IP as the source of mesh connections", "reason", c.transparentWhy, "verifier", fmt.Sprintf("%v", ve))
		if err = spec.Variables[captureVarLookupIfindex].Set(uint32(0)); err != nil {
			return nil, fmt.Errorf("loading capture: %w", err)
		}
		err = spec.LoadAndAssign(&c.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: c.mapsDir}})
	}
	if err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("loading capture: maps pinned under %s come from an incompatible agent version; stop the agent and remove that directory (pods stay fail-closed until the agent is back): %w", c.mapsDir, err)
		}
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("loading capture: the kernel's verifier rejected a program (kernel too old? see docs/capture.md): %+v", ve)
		}
		return nil, fmt.Errorf("loading capture: %w", err)
	}
	defer func() {
		if err != nil {
			c.release()
		}
	}()

	root := cfg.CgroupRoot
	if err := c.attachCgroup("connect4", root, ebpf.AttachCGroupInet4Connect, c.objs.NmConnect4); err != nil {
		return nil, err
	}
	if err := c.attachCgroup("connect6", root, ebpf.AttachCGroupInet6Connect, c.objs.NmConnect6); err != nil {
		return nil, err
	}
	if err := c.attachCgroup("sockops", root, ebpf.AttachCGroupSockOps, c.objs.NmSockops); err != nil {
		return nil, err
	}
	if !within(cfg.AgentCgroup, root) {
		// The self-check probe is the agent's own unmarked socket in the
		// pod's namespace; capture must see it exactly as an app socket.
		if err := c.attachCgroup("connect4-agent", cfg.AgentCgroup, ebpf.AttachCGroupInet4Connect, c.objs.NmConnect4); err != nil {
			return nil, err
		}
		if err := c.attachCgroup("connect6-agent", cfg.AgentCgroup, ebpf.AttachCGroupInet6Connect, c.objs.NmConnect6); err != nil {
			return nil, err
		}
	} else {
		c.dropPinnedLink("connect4-agent")
		c.dropPinnedLink("connect6-agent")
	}
	if err := c.readoptPods(); err != nil {
		return nil, err
	}

	c.accelWhy = "disabled by configuration"
	if cfg.Accel == AccelAuto || cfg.Accel == AccelForce {
		c.setupAccel(ctx)
	}
	if !c.accel {
		if err := c.setAccelFlag(false); err != nil {
			return nil, err
		}
	}
	log.Info("capture loaded", "cgroup_root", root, "pin_dir", cfg.PinDir, "adopted", c.adopted,
		"adopted_pods", len(c.pods), "accel", c.accel, "accel_reason", c.accelWhy,
		"transparent_delivery", c.transparent, "transparent_reason", c.transparentWhy)
	return c, nil
}

// attachCgroup attaches prog at cgroup under pin name, or updates the
// pinned link of a previous instance to prog. A pinned link on another
// cgroup is replaced after the new one is attached, never before.
func (c *Capture) attachCgroup(name, cgroup string, typ ebpf.AttachType, prog *ebpf.Program) error {
	pin := filepath.Join(c.linksDir, name)
	wantID, err := cgroupID(cgroup)
	if err != nil {
		return fmt.Errorf("attaching %s: %w", name, err)
	}
	var stale link.Link
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == wantID {
			if err := old.Update(prog); err != nil {
				old.Close()
				return fmt.Errorf("replacing the %s program on %s: %w", name, cgroup, err)
			}
			c.links[name] = old
			return nil
		}
		stale = old
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("opening pinned link %s: %w", pin, err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: typ, Program: prog})
	if err != nil {
		if stale != nil {
			stale.Close()
		}
		return fmt.Errorf("attaching %s at cgroup %s: %w", name, cgroup, err)
	}
	if stale != nil {
		stale.Unpin()
		stale.Close()
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return fmt.Errorf("pinning %s link (bpf_link needs Linux 5.7+): %w", name, err)
	}
	c.links[name] = l
	return nil
}

// dropPinnedLink detaches and unpins a link left by a previous instance
// that this configuration does not use.
func (c *Capture) dropPinnedLink(name string) {
	pin := filepath.Join(c.linksDir, name)
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return
	}
	l.Unpin()
	l.Close()
}

func (c *Capture) setAccelFlag(on bool) error {
	v := captureConfig{}
	if on {
		v.Accel = 1
	}
	if err := c.objs.Settings.Put(uint32(0), v); err != nil {
		return fmt.Errorf("setting acceleration flag: %w", err)
	}
	return nil
}

// Adopted reports whether Load found and adopted the pinned objects of a
// previous agent instance.
func (c *Capture) Adopted() bool { return c.adopted }

// Mark is the SO_MARK that exempts a socket from capture.
func (c *Capture) Mark() uint32 { return c.cfg.Mark }

// DeliverMark is the SO_MARK of transparent delivery sockets.
func (c *Capture) DeliverMark() uint32 { return c.cfg.DeliverMark }

// Transparent reports whether inbound connections can be delivered with
// the peer's address as source on this kernel and configuration, and why
// (not). Each pod also proves it at Enroll (EnrolledPod.Delivery).
func (c *Capture) Transparent() (on bool, reason string) { return c.transparent, c.transparentWhy }

// Accel reports whether same-node acceleration is on, and why (or why not).
func (c *Capture) Accel() (on bool, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.accel, c.accelWhy
}

// SetAccel turns same-node acceleration on or off for new connections.
// Turning it on is refused when the start-up self-test failed.
func (c *Capture) SetAccel(on bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if on && !c.accelOK {
		return fmt.Errorf("enabling same-node acceleration: unavailable: %s", c.accelWhy)
	}
	if err := c.setAccelFlag(on); err != nil {
		return err
	}
	c.accel = on
	if on {
		c.accelWhy = "enabled"
	} else {
		c.accelWhy = "disabled at runtime"
	}
	return nil
}

// Release closes the agent's handles but leaves every program, map and
// link pinned and attached: enrolled pods stay captured and, with the
// agent's listeners gone, fail closed until a new agent adopts them. Use it
// for restarts and upgrades; Close uninstalls.
func (c *Capture) Release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	for _, p := range c.pods {
		p.closeListeners()
	}
	return c.release()
}

// release closes file descriptors only; pins keep the kernel objects.
func (c *Capture) release() error {
	var errs []error
	for _, p := range c.pods {
		if p.link != nil {
			errs = append(errs, p.link.Close())
		}
	}
	for _, l := range c.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, c.objs.Close())
	return errors.Join(errs...)
}

// Close uninstalls capture: it detaches every program, unpins and closes
// every map and link, and closes the agent's in-pod listeners. Enrolled
// pods get plain networking back at once.
func (c *Capture) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	var errs []error
	// Stop capturing new connects first.
	for _, name := range []string{"connect4", "connect6", "connect4-agent", "connect6-agent", "sockops", "sockops-agent"} {
		if l, ok := c.links[name]; ok {
			errs = append(errs, l.Unpin(), l.Close())
			delete(c.links, name)
		}
	}
	for cookie, p := range c.pods {
		errs = append(errs, c.dropPod(cookie, p))
	}
	if c.skmsg {
		errs = append(errs, link.RawDetachProgram(link.RawDetachProgramOptions{
			Target: c.objs.Sockhash.FD(), Program: c.objs.NmSkmsg, Attach: ebpf.AttachSkMsgVerdict,
		}))
		c.skmsg = false
	}
	for _, m := range c.allMaps() {
		if err := m.Unpin(); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, c.objs.Close())
	// Only our own directories: a shared bpffs may hold other pins.
	for _, d := range []string{c.podsDir, c.linksDir, c.mapsDir, c.cfg.PinDir} {
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing pin directory: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("closing capture: %w", err)
	}
	return nil
}

func (c *Capture) allMaps() []*ebpf.Map {
	m := c.objs.captureMaps
	return []*ebpf.Map{m.AccelProbe, m.Enrolled, m.Excluded, m.Inbound, m.InboundExcluded, m.InboundSocks,
		m.LookupStats, m.NodeAddrs, m.NodeProbePorts, m.Origdst, m.Pending, m.Settings, m.Sockhash, m.Stats, m.Taint}
}

// SetNodeAddrs makes addrs the node's own addresses: the sources from
// which connections to an enrolled pod's probe ports (Pod.NodeProbePorts)
// reach the pod directly while the agent's inbound listener is absent.
// Pass the addresses of the node's interfaces, where kubelet's probes come
// from; loopback, link-local, multicast and unspecified addresses are left
// out (no probe comes from them, and a link-local source is not the node's
// alone). The set is pinned: it outlives the agent, which is the point.
// It returns whether the set changed.
func (c *Capture) SetNodeAddrs(addrs []netip.Addr) (bool, error) {
	want := map[captureIpKey]bool{}
	for _, a := range addrs {
		a = a.Unmap()
		if !a.IsValid() || a.IsUnspecified() || a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsLinkLocalMulticast() {
			continue
		}
		fam, k := keyFromIP(a)
		want[captureIpKey{Family: fam, Addr: k}] = true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false, ErrClosed
	}
	var k captureIpKey
	var v uint8
	have := map[captureIpKey]bool{}
	it := c.objs.NodeAddrs.Iterate()
	for it.Next(&k, &v) {
		have[k] = true
	}
	if err := it.Err(); err != nil {
		return false, fmt.Errorf("reading the node's addresses: %w", err)
	}
	changed := false
	for k := range want {
		if have[k] {
			continue
		}
		if err := c.objs.NodeAddrs.Put(k, uint8(1)); err != nil {
			return changed, fmt.Errorf("adding node address %v: %w", ipFromKey(k.Family, k.Addr), err)
		}
		changed = true
	}
	for k := range have {
		if want[k] {
			continue
		}
		if err := c.objs.NodeAddrs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return changed, fmt.Errorf("removing node address %v: %w", ipFromKey(k.Family, k.Addr), err)
		}
		changed = true
	}
	return changed, nil
}

// NodeAddrs returns the node addresses SetNodeAddrs last stored (by this
// agent or a previous one).
func (c *Capture) NodeAddrs() ([]netip.Addr, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	var out []netip.Addr
	var k captureIpKey
	var v uint8
	it := c.objs.NodeAddrs.Iterate()
	for it.Next(&k, &v) {
		out = append(out, ipFromKey(k.Family, k.Addr))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading the node's addresses: %w", err)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// Stats returns the capture programs' counters summed over CPUs.
func (c *Capture) Stats() (map[string]uint64, error) {
	names := []string{"connect_captured", "connect_excluded", "origdst_recorded", "sockhash_added",
		"msg_redirected", "msg_passed", "lookup_assigned", "lookup_dropped"}
	out := make(map[string]uint64, len(names))
	for i, n := range names {
		var per []uint64
		if err := c.objs.Stats.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("reading capture stats: %w", err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out[n] = sum
	}
	for i, n := range []string{"lookup_unknown_dropped", "lookup_excluded", "lookup_node_passed"} {
		var per []uint64
		if err := c.objs.LookupStats.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("reading capture stats: %w", err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out[n] = sum
	}
	return out, nil
}

func cookieName(cookie uint64) string { return strconv.FormatUint(cookie, 10) }

// Status is what readiness, metrics and nodemeshctl report about capture.
type Status struct {
	Accel       bool   `json:"accel"`
	AccelReason string `json:"accelReason"`
	// Transparent delivery (the peer's address as source) on this node.
	Transparent       bool        `json:"transparentDelivery"`
	TransparentReason string      `json:"transparentDeliveryReason"`
	Adopted           bool        `json:"adopted"`
	Pods              []PodStatus `json:"pods"`
}

// PodStatus is one enrolled pod's capture state. Verified is true only
// after a successful SelfCheck; anything else must be reported as not
// captured.
type PodStatus struct {
	Name      string       `json:"name"`
	Cookie    uint64       `json:"netnsCookie"`
	IPs       []netip.Addr `json:"ips"`
	Verified  bool         `json:"verified"`
	CheckedAt time.Time    `json:"checkedAt,omitzero"`
	Error     string       `json:"error,omitempty"`
	// SourcePreserved: inbound connections reach the application from
	// the peer's address; else from the pod's own (SourceReason says why).
	SourcePreserved bool   `json:"sourcePreserved"`
	SourceReason    string `json:"sourceReason,omitempty"`
}

// Status returns the current capture state.
func (c *Capture) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := Status{Accel: c.accel, AccelReason: c.accelWhy, Adopted: c.adopted, Transparent: c.transparent, TransparentReason: c.transparentWhy}
	for cookie, p := range c.pods {
		ps := PodStatus{Cookie: cookie, IPs: slices.Clone(p.ips)}
		if p.ep == nil {
			ps.Error = "left enrolled by a previous agent and not enrolled again: fail closed"
		} else {
			var err error
			ps.Name = p.ep.Name
			ps.SourcePreserved, ps.SourceReason = p.ep.SourcePreserved()
			ps.Verified, ps.CheckedAt, err = p.ep.Verified()
			switch {
			case err != nil:
				ps.Error = err.Error()
			case ps.CheckedAt.IsZero():
				ps.Error = "capture not verified yet"
			}
		}
		st.Pods = append(st.Pods, ps)
	}
	slices.SortFunc(st.Pods, func(a, b PodStatus) int { return strings.Compare(a.Name, b.Name) })
	return st
}
