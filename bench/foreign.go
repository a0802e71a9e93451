package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// foreignLimit is the share of the machine's CPU that processes outside
// the bench may use during a measured run before its comparisons are
// called inconclusive: above it, tails measure waiting for a CPU.
const foreignLimit = 0.10

// foreignMeter measures the CPU used on the machine by everything that is
// not the bench: all busy CPU time (/proc/stat) minus the bench lab's
// cgroup tree (API server, etcd, pods, node processes, sidecars, agents)
// minus this process. Load averages cannot tell the two apart: the bench
// itself keeps more processes runnable than a 2-CPU machine has CPUs, and
// a build that ended just before the run still weighs on the 1-minute
// average.
type foreignMeter struct {
	labCgroup string // the lab's cgroup v2 directory
	cpus      int
}

// foreignSample is one reading of the three counters.
type foreignSample struct {
	at              time.Time
	busy, lab, self time.Duration
}

func newForeignMeter(labCgroup string, cpus int) *foreignMeter {
	return &foreignMeter{labCgroup: labCgroup, cpus: cpus}
}

func (m *foreignMeter) sample() (foreignSample, error) {
	s := foreignSample{at: time.Now()}
	var err error
	if s.busy, err = machineBusy(); err != nil {
		return s, err
	}
	if s.lab, err = cgroupUsage(m.labCgroup); err != nil {
		return s, err
	}
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return s, fmt.Errorf("getrusage: %w", err)
	}
	s.self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return s, nil
}

// share returns the fraction of the machine's CPU capacity used outside
// the bench between two samples (0 when the counters disagree by less
// than their resolution).
func (m *foreignMeter) share(a, b foreignSample) float64 {
	wall := b.at.Sub(a.at)
	if wall <= 0 || m.cpus <= 0 {
		return 0
	}
	other := (b.busy - a.busy) - (b.lab - a.lab) - (b.self - a.self)
	return max(0, float64(other)/(float64(wall)*float64(m.cpus)))
}

// clockTick is USER_HZ, the unit of /proc/stat: 100 on every Linux ABI
// Go supports.
const clockTick = 100

// machineBusy returns all CPUs' non-idle time from /proc/stat.
func machineBusy() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	return parseProcStatBusy(b)
}

// parseProcStatBusy sums the aggregate "cpu" line's fields other than
// idle and iowait (guest time is already part of user and nice).
func parseProcStatBusy(b []byte) (time.Duration, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 8 || f[0] != "cpu" {
			continue
		}
		var ticks uint64
		for i, v := range f[1:] {
			if i == 3 || i == 4 || i >= 8 { // idle, iowait; guest, guest_nice
				continue
			}
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/stat: field %d of the cpu line: %w", i+1, err)
			}
			ticks += n
		}
		return time.Duration(ticks) * time.Second / clockTick, nil
	}
	return 0, errors.New("/proc/stat: no aggregate cpu line")
}

// cgroupUsage returns a cgroup v2 directory's usage_usec from cpu.stat.
func cgroupUsage(dir string) (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s/cpu.stat: usage_usec: %w", dir, err)
			}
			return time.Duration(n) * time.Microsecond, nil
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat has no usage_usec", dir)
}

// upperFirst capitalises the first letter of a note used as a sentence.
func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
