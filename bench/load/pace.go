package load

import "time"

// Schedule is the uniform open-loop timetable of one connection: request
// i of connection c (of n) at rate r requests/s in total is due at
// offset + i*n/r, with connections phase-shifted by 1/r so that the
// aggregate arrivals are evenly spaced. There is no catch-up burst: a
// late request is sent as soon as the connection is free, and the next
// one keeps its own due time.
type Schedule struct {
	Interval time.Duration // between two requests of this connection
	Phase    time.Duration // due time of request 0
}

// NewSchedule returns connection c's timetable; rate is requests/s over
// all n connections. It returns false for a rate or count that cannot be
// paced (rate <= 0, n < 1, c out of range, or an interval under 1 ns).
func NewSchedule(rate float64, n, c int) (Schedule, bool) {
	if !(rate > 0) || n < 1 || c < 0 || c >= n {
		return Schedule{}, false
	}
	iv := time.Duration(float64(n) / rate * float64(time.Second))
	if iv < 1 {
		return Schedule{}, false
	}
	return Schedule{Interval: iv, Phase: time.Duration(float64(c) / rate * float64(time.Second))}, true
}

// Due is the offset from the run's start at which request i is due.
func (s Schedule) Due(i int) time.Duration { return s.Phase + time.Duration(i)*s.Interval }

// Corrector turns measured request timings into latencies corrected for
// coordinated omission, charging the system under test only for delay it
// caused.
//
// A client that paces with timers wakes late (Go's sleeps overshoot by
// about a millisecond on Linux), and a naive correction that measures from
// the due time would report that overshoot as latency. Corrector instead
// replays the connection on a virtual timeline on which the load generator
// is perfect: each request is sent at the later of its due time and the
// virtual completion of the previous request on the connection, and takes
// the service time measured for it in reality (response received minus
// actually sent). The charged latency is virtual completion minus due time:
// the measured service time plus any queueing behind earlier slow
// responses, and nothing for the generator's own lateness.
type Corrector struct {
	vdone time.Duration
}

// Charge returns the latency to record for a request due at due, actually
// written at sent and answered at done (offsets from the run's start).
// Calls must follow the order of requests on one connection.
func (c *Corrector) Charge(due, sent, done time.Duration) time.Duration {
	service := max(done-sent, 0)
	start := max(due, c.vdone)
	c.vdone = start + service
	return c.vdone - due
}
