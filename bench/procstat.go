package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// procSample is one reading of a process's CPU time and memory.
type procSample struct {
	CPUNanos int64 // on-CPU time of all its threads
	RSS      int64 // bytes, now
	HWM      int64 // bytes, peak resident set (VmHWM)
}

// readProc reads pid's CPU time from /proc/<pid>/task/*/schedstat
// (nanosecond resolution, the sum over threads) - falling back to
// utime+stime of /proc/<pid>/stat at 10 ms resolution when schedstat is
// missing - and its memory from /proc/<pid>/status.
func readProc(pid int) (procSample, error) {
	var s procSample
	base := "/proc/" + strconv.Itoa(pid)
	tasks, err := filepath.Glob(base + "/task/*/schedstat")
	if err != nil || len(tasks) == 0 {
		cpu, err := statCPU(base + "/stat")
		if err != nil {
			return s, err
		}
		s.CPUNanos = cpu
	} else {
		for _, t := range tasks {
			b, err := os.ReadFile(t)
			if err != nil {
				continue // thread exited meanwhile
			}
			f := strings.Fields(string(b))
			if len(f) < 1 {
				continue
			}
			v, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return s, fmt.Errorf("parsing %s: %w", t, err)
			}
			s.CPUNanos += v
		}
	}
	st, err := os.ReadFile(base + "/status")
	if err != nil {
		return s, fmt.Errorf("reading process %d status: %w", pid, err)
	}
	s.RSS, s.HWM = parseStatusMem(st)
	return s, nil
}

func statCPU(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w", path, err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parsing %s: no command field", path)
	}
	f := strings.Fields(string(b[i+1:]))
	// After "(comm)": state is field 3 of the line, utime 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("parsing %s: %d fields", path, len(f))
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parsing %s: bad utime/stime", path)
	}
	// USER_HZ is 100 on every Linux architecture Go supports.
	return (u + st) * 10_000_000, nil
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
