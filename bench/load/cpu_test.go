package load

import (
	"context"
	"math"
	"os"
	"strings"
	"testing"
	"time"
)

func TestProcessCPU(t *testing.T) {
	c, err := ProcessCPU(os.Getpid())
	if err != nil || c <= 0 {
		t.Fatalf("own process: %d, %v", c, err)
	}
	if c, err := statCPU("/proc/self/stat"); err != nil || c < 0 {
		t.Errorf("stat cpu %d: %v", c, err)
	}
	if _, err := ProcessCPU(1 << 30); err == nil {
		t.Error("a missing process was read")
	}
}

// TestCPUWatchWindow burns CPU only inside the window and checks that
// the watch saw it there, with the window's length.
func TestCPUWatchWindow(t *testing.T) {
	from := time.Now().Add(30 * time.Millisecond)
	to := from.Add(150 * time.Millisecond)
	w := startCPUWatch(context.Background(), []int{os.Getpid()}, from, to)
	time.Sleep(time.Until(from))
	x := 1.0
	for time.Now().Before(to.Add(20 * time.Millisecond)) {
		x = math.Sqrt(x + 1)
	}
	cpu, wall, err := w.finish()
	if err != nil {
		t.Fatal(err)
	}
	if len(cpu) != 1 || cpu[0] <= 0 || wall <= 0 {
		t.Errorf("window CPU %v over %v (x %v)", cpu, wall, x)
	}
}

func TestCPUWatchEndsEarly(t *testing.T) {
	w := startCPUWatch(context.Background(), []int{os.Getpid()}, time.Now().Add(time.Hour), time.Now().Add(2*time.Hour))
	if _, _, err := w.finish(); err == nil || !strings.Contains(err.Error(), "before its measured window") {
		t.Errorf("a workload that ended before its window: %v", err)
	}
	// Ending inside the window closes it there.
	w = startCPUWatch(context.Background(), []int{os.Getpid()}, time.Now(), time.Now().Add(time.Hour))
	time.Sleep(20 * time.Millisecond)
	cpu, wall, err := w.finish()
	if err != nil || len(cpu) != 1 || wall <= 0 || wall > time.Minute {
		t.Errorf("ended inside the window: %v over %v: %v", cpu, wall, err)
	}
	w = startCPUWatch(context.Background(), []int{1 << 30}, time.Now(), time.Now().Add(time.Hour))
	time.Sleep(20 * time.Millisecond)
	if _, _, err := w.finish(); err == nil {
		t.Error("a missing process was watched")
	}
}

func TestValidateWatch(t *testing.T) {
	c := Config{Kind: KindRR, Addr: "127.0.0.1:1", Duration: time.Second, WatchPids: []int{0}}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "above 0") {
		t.Errorf("pid 0: %v", err)
	}
	c.WatchPids = make([]int, maxWatch+1)
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Errorf("too many: %v", err)
	}
}
