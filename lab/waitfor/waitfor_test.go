package waitfor

import (
	"errors"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// fakeT records Fatalf and ends the calling goroutine, as testing.T does.
type fakeT struct {
	testing.TB
	failed atomic.Bool
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.failed.Store(true)
	runtime.Goexit() // as testing.T does
}

func TestTrue(t *testing.T) {
	var n atomic.Int32
	True(t, 5*time.Second, "the third poll", func() bool { return n.Add(1) >= 3 })
	if n.Load() != 3 {
		t.Errorf("polled %d times, want 3", n.Load())
	}
}

func TestNoError(t *testing.T) {
	var n atomic.Int32
	NoError(t, 5*time.Second, "the third poll", func() error {
		if n.Add(1) < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if n.Load() != 3 {
		t.Errorf("polled %d times, want 3", n.Load())
	}
}

func TestTimeouts(t *testing.T) {
	for name, wait := range map[string]func(testing.TB){
		"True": func(tb testing.TB) { True(tb, 30*time.Millisecond, "never", func() bool { return false }) },
		"NoError": func(tb testing.TB) {
			NoError(tb, 30*time.Millisecond, "never", func() error { return errors.New("broken") })
		},
	} {
		ft := &fakeT{TB: t}
		done := make(chan struct{})
		go func() {
			defer close(done)
			wait(ft)
		}()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not give up after its deadline", name)
		}
		if !ft.failed.Load() {
			t.Errorf("%s: a condition that never held did not fail the test", name)
		}
	}
}
