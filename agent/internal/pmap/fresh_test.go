package pmap

import "testing"

func TestFresh(t *testing.T) {
	small := map[int]bool{1: true, 2: true}
	if got := Fresh(small); len(got) != 0 || len(small) != 0 {
		t.Fatalf("a small map is not emptied in place: %v", got)
	}
	big := make(map[int]bool)
	for i := range freshMax + 1 {
		big[i] = true
	}
	got := Fresh(big)
	if len(got) != 0 {
		t.Fatalf("Fresh left %d entries", len(got))
	}
	got[-1] = true
	if big[-1] || len(big) != freshMax+1 {
		t.Fatal("a map that held more than freshMax entries was reused, keeping its table")
	}
	if Fresh[int, bool](nil) == nil {
		t.Fatal("Fresh(nil) is nil")
	}
}
