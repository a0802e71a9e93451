package workloads

import (
	"fmt"
	"io"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Reported holds the network namespaces that the CNI plugin handed the
// agent at sandbox creation (agent/cni), by pod UID, for the Locator: a
// pod is then found before any of its processes exists, and its addresses
// are known before kubelet writes them to the API. Safe for concurrent use.
//
// A reported namespace is an open descriptor, named by the path
// /proc/self/fd/N that the data plane uses like any namespace path. Its
// descriptor is closed only closeDelay after the report is dropped: the
// data plane may still dial into the namespace while a leaving pod's
// connections drain, and the number must not be reused by another pod's
// namespace meanwhile.
type Reported struct {
	mu      sync.Mutex
	byUID   map[string]*Report
	closing []closingFile
	now     func() time.Time
	delay   time.Duration
}

// Report is one reported sandbox.
type Report struct {
	UID, Namespace, Name, ContainerID string
	// Netns is the path the data plane uses for the namespace.
	Netns string
	IPs   []netip.Addr
	file  io.Closer
	at    time.Time // when it was put
}

type closingFile struct {
	f  io.Closer
	at time.Time
}

// closeDelay is the least time a dropped report's descriptor stays open
// (NewReported makes it longer than the drain deadline: a leaving pod's
// dials stop with its proxy).
const closeDelay = 2 * time.Minute

// keepGrace is how long a report outlives its pod's absence from the
// cluster state (Keep).
const keepGrace = time.Minute

// NewReported returns an empty table for a data plane whose leaving pods
// drain for up to drain.
func NewReported(drain time.Duration) *Reported {
	return &Reported{byUID: make(map[string]*Report), now: time.Now, delay: max(closeDelay, drain+time.Minute)}
}

// Put records the sandbox of a pod, taking ownership of f (the namespace
// file, with descriptor fd). A previous report for the same pod (an older
// sandbox) is dropped.
func (r *Reported) Put(rep Report, f io.Closer, fd uintptr) *Report {
	rep.file = f
	rep.Netns = fmt.Sprintf("/proc/self/fd/%d", fd)
	rep.IPs = slices.Clone(rep.IPs)
	r.mu.Lock()
	defer r.mu.Unlock()
	rep.at = r.now()
	r.reapLocked()
	if old := r.byUID[rep.UID]; old != nil {
		r.dropLocked(old)
	}
	r.byUID[rep.UID] = &rep
	return &rep
}

// Get returns the report for a pod UID.
func (r *Reported) Get(uid string) (Report, bool) {
	if r == nil || uid == "" {
		return Report{}, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	rep, ok := r.byUID[uid]
	if !ok {
		return Report{}, false
	}
	return *rep, true
}

// Forget drops the report of the sandbox containerID (CNI DEL); a report
// of another sandbox of the pod stays. uid, when set, narrows the search.
func (r *Reported) Forget(uid, containerID string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for u, rep := range r.byUID {
		if (uid == "" || u == uid) && rep.ContainerID == containerID {
			r.dropLocked(rep)
		}
	}
	r.reapLocked()
}

// Keep drops the reports of pods not in live (UIDs of the node's pods in
// a cluster state snapshot). A report younger than keepGrace stays: the
// snapshot may predate the pod (the CNI server checks a newer one).
func (r *Reported) Keep(live map[string]bool) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	for uid, rep := range r.byUID {
		if !live[uid] && now.Sub(rep.at) >= keepGrace {
			r.dropLocked(rep)
		}
	}
	r.reapLocked()
}

// Len returns the number of reports held.
func (r *Reported) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.byUID)
}

// Close closes every descriptor (the agent is stopping).
func (r *Reported) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rep := range r.byUID {
		rep.file.Close()
	}
	for _, c := range r.closing {
		c.f.Close()
	}
	r.byUID, r.closing = make(map[string]*Report), nil
}

func (r *Reported) dropLocked(rep *Report) {
	delete(r.byUID, rep.UID)
	r.closing = append(r.closing, closingFile{f: rep.file, at: r.now()})
}

func (r *Reported) reapLocked() {
	now := r.now()
	keep := r.closing[:0]
	for _, c := range r.closing {
		if now.Sub(c.at) >= r.delay {
			c.f.Close()
		} else {
			keep = append(keep, c)
		}
	}
	r.closing = keep
}
