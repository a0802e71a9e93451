package intern

import (
	"runtime"
	"testing"
	"time"
	"unsafe"
)

type port struct {
	name string
	n    int
}

func TestSlicesShareEqualContents(t *testing.T) {
	var tab Slices[port]
	a := tab.Make("http/80", []port{{"http", 80}})
	b := tab.Make("http/80", []port{{"http", 80}})
	c := tab.Make("http/81", []port{{"http", 81}})
	if unsafe.SliceData(a) != unsafe.SliceData(b) {
		t.Error("equal keys gave separate arrays")
	}
	if unsafe.SliceData(a) == unsafe.SliceData(c) || c[0].n != 81 {
		t.Errorf("another key gave %v, sharing the first array", c)
	}
	if len(a) != 1 || cap(a) != 1 || a[0] != (port{"http", 80}) {
		t.Errorf("interned %v (cap %d)", a, cap(a))
	}
	if got := tab.Make("", nil); got != nil {
		t.Errorf("empty slice interned as %v", got)
	}
	runtime.KeepAlive(b)
	runtime.KeepAlive(c)
}

// An entry goes once no slice of it is reachable, so churn cannot grow a
// table.
func TestSlicesDropsUnreachableEntries(t *testing.T) {
	var tab Slices[port]
	for i := range 100 {
		tab.Make(string(rune('a'+i%26))+string(rune('0'+i/26)), []port{{"p", i}})
	}
	keep := tab.Make("kept", []port{{"k", 1}})
	deadline := time.Now().Add(5 * time.Second)
	for tab.Len() > 1 && time.Now().Before(deadline) {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	if n := tab.Len(); n != 1 {
		t.Fatalf("%d entries left, want the 1 still referenced", n)
	}
	if again := tab.Make("kept", []port{{"k", 1}}); unsafe.SliceData(again) != unsafe.SliceData(keep) {
		t.Error("the referenced entry was not kept")
	}
	runtime.KeepAlive(keep)
}

// Port lists share an array exactly when their names, numbers and
// protocols are equal; a name cannot run into the number after it.
func TestPortsKeyOnEveryField(t *testing.T) {
	type cp struct {
		name, proto string
		n           int32
	}
	tab := NewPorts(func(p cp) (string, int64, string) { return p.name, int64(p.n), p.proto })
	a := tab.Make([]cp{{"http", "TCP", 80}, {"dns", "UDP", 53}})
	b := tab.Make([]cp{{"http", "TCP", 80}, {"dns", "UDP", 53}})
	if unsafe.SliceData(a) != unsafe.SliceData(b) {
		t.Error("equal lists gave separate arrays")
	}
	for _, other := range [][]cp{
		{{"http", "TCP", 80}},
		{{"http", "TCP", 81}, {"dns", "UDP", 53}},
		{{"http", "UDP", 80}, {"dns", "UDP", 53}},
		{{"http8", "TCP", 0}, {"dns", "UDP", 53}},
		{{"dns", "UDP", 53}, {"http", "TCP", 80}},
	} {
		if c := tab.Make(other); unsafe.SliceData(c) == unsafe.SliceData(a) || len(c) != len(other) || c[0] != other[0] {
			t.Errorf("%v interned as %v, sharing %v's array", other, c, a)
		}
	}
	if got := tab.Make(nil); got != nil {
		t.Errorf("no ports interned as %v", got)
	}
	runtime.KeepAlive(b)
}

func TestIntsShareEqualLists(t *testing.T) {
	var tab Ints[uint16]
	a := tab.Make([]uint16{8080, 9090})
	b := tab.Make([]uint16{8080, 9090})
	if unsafe.SliceData(a) != unsafe.SliceData(b) {
		t.Error("equal lists gave separate arrays")
	}
	for _, other := range [][]uint16{{8080}, {808, 9090}, {9090, 8080}, {8080, 9090, 1}} {
		if c := tab.Make(other); unsafe.SliceData(c) == unsafe.SliceData(a) || len(c) != len(other) {
			t.Errorf("%v interned as %v, sharing %v's array", other, c, a)
		}
	}
	if got := tab.Make(nil); got != nil {
		t.Errorf("no ports interned as %v", got)
	}
	runtime.KeepAlive(b)
}
