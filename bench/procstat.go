package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/nodemesh/nodemesh/bench/load"
)

// procSample is one reading of a process's CPU time and memory.
type procSample struct {
	CPUNanos int64 // on-CPU time of all its threads
	RSS      int64 // bytes, now
	HWM      int64 // bytes, peak resident set (VmHWM)
}

// readProc reads pid's CPU time (load.ProcessCPU) and its memory from
// /proc/<pid>/status.
func readProc(pid int) (procSample, error) {
	var s procSample
	cpu, err := load.ProcessCPU(pid)
	if err != nil {
		return s, err
	}
	s.CPUNanos = cpu
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return s, fmt.Errorf("reading process %d status: %w", pid, err)
	}
	s.RSS, s.HWM = parseStatusMem(st)
	return s, nil
}

// parseStatusMem returns VmRSS and VmHWM in bytes.
func parseStatusMem(b []byte) (rss, hwm int64) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		var dst *int64
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			dst = &rss
		case strings.HasPrefix(line, "VmHWM:"):
			dst = &hwm
		default:
			continue
		}
		f := strings.Fields(line)
		if len(f) >= 2 {
			if v, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				*dst = v * 1024
			}
		}
	}
	return rss, hwm
}
