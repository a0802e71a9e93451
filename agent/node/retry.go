package node

import (
	"log/slog"
	"time"

	"github.com/nodemesh/nodemesh/agent/state"
)

// Bounds of the per-pod retry backoff (pendingPods).
const (
	retryFirst = 200 * time.Millisecond
	retryMax   = 5 * time.Second
)

// pendingPods schedules the next reconcile for pods the mesh wants but has
// not captured yet: enrolled pods whose network namespace is not found yet,
// and pods whose enrollment or self-check failed. Each pod waits retryFirst
// after it first turned pending, then twice as long after each retry that
// left it pending, up to retryMax; the mesh reconciles at the earliest of
// these times. A reconcile retries every pending pod at once, so many
// pending pods cost one reconcile per due time, never a loop per pod.
//
// Each pod's wait is logged once, when it starts, and once when it ends.
// Only run's goroutine uses it.
type pendingPods struct {
	log        *slog.Logger
	first, max time.Duration
	pods       map[state.Key]*pendingPod
}

type pendingPod struct {
	uid   string
	since time.Time
	wait  time.Duration
	next  time.Time
}

func newPendingPods(log *slog.Logger) *pendingPods {
	return &pendingPods{log: log, first: retryFirst, max: retryMax, pods: make(map[state.Key]*pendingPod)}
}

// update records the pods still pending after a reconcile at now (key →
// pod UID and why it is pending) and returns when the next reconcile is
// due (zero: none pending). A pod pending at or after its due time was
// just retried: its wait doubles. A pod that is no longer pending, or is
// a new pod under the same name (another UID), is forgotten.
func (r *pendingPods) update(now time.Time, pending map[state.Key]pendingReason) time.Time {
	for k, p := range r.pods {
		if why, ok := pending[k]; !ok || why.UID != p.uid {
			if !ok {
				r.log.Info("pod no longer waiting for capture", "pod", k.String(), "waited", now.Sub(p.since).Round(time.Millisecond))
			}
			delete(r.pods, k)
		}
	}
	for k, why := range pending {
		p := r.pods[k]
		switch {
		case p == nil:
			r.start(now, k, why)
		case !now.Before(p.next):
			p.wait = min(2*p.wait, r.max)
			p.next = now.Add(p.wait)
		}
	}
	return r.next()
}

// add records pods that turned pending between reconciles (a failed
// self-check) and returns when the next reconcile is due. Pods already
// pending keep their schedule: a failure the last reconcile caused does not
// bring the next one forward.
func (r *pendingPods) add(now time.Time, pending map[state.Key]pendingReason) time.Time {
	for k, why := range pending {
		if p := r.pods[k]; p == nil || p.uid != why.UID {
			r.start(now, k, why)
		}
	}
	return r.next()
}

func (r *pendingPods) start(now time.Time, k state.Key, why pendingReason) {
	r.pods[k] = &pendingPod{uid: why.UID, since: now, wait: r.first, next: now.Add(r.first)}
	r.log.Info("pod waiting for capture; retrying with backoff", "pod", k.String(), "reason", why.Reason,
		"first_retry", r.first, "max_interval", r.max)
}

// next is the earliest due time (zero: none pending).
func (r *pendingPods) next() time.Time {
	var next time.Time
	for _, p := range r.pods {
		if next.IsZero() || p.next.Before(next) {
			next = p.next
		}
	}
	return next
}

// pendingReason is why a pod waits: its UID (a pod recreated under the same
// name starts over) and a short reason for the log.
type pendingReason struct {
	UID    string
	Reason string
}
