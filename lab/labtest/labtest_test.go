package labtest

import (
	"os/exec"
	"strings"
	"testing"
)

func TestGoBuild(t *testing.T) {
	bin := GoBuild(t, "./lab/labtest/testdata/hello")
	if again := GoBuild(t, "./lab/labtest/testdata/hello"); again != bin {
		t.Errorf("second build at %s, first at %s", again, bin)
	}
	out, _ := exec.Command(bin).CombinedOutput()
	if !strings.Contains(string(out), "hello from a labtest build") {
		t.Errorf("built binary printed %q", out)
	}
}

func TestNewID(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		id := NewID()
		if len(id) != 6 || id[0] != 't' || strings.Trim(id, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
			t.Fatalf("bad id %q", id)
		}
		seen[id] = true
	}
	if len(seen) < 95 {
		t.Errorf("only %d distinct IDs in 100", len(seen))
	}
}
