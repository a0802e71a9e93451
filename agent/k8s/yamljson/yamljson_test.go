package yamljson

import (
	"strings"
	"testing"
)

func TestToJSON(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		// YAML 1.1 booleans stay strings, as kubectl keeps them.
		{"namespace: y", `{"namespace":"y"}`},
		{"a: [y, n, yes, no, on, off, Y, NO, On]", `{"a":["y","n","yes","no","on","off","Y","NO","On"]}`},
		{"a: true\nb: false\nc: True", `{"a":true,"b":false,"c":true}`},
		{"a: 1\nb: 0x10\nc: 1.5\nd: -3\ne: 1e3\nf: 012", `{"a":1,"b":16,"c":1.5,"d":-3,"e":1000,"f":12}`},
		{"a: ~\nb: null\nc:", `{"a":null,"b":null,"c":null}`},
		{"a: 2024-01-01\nb: 2024-01-01T10:00:00Z", `{"a":"2024-01-01","b":"2024-01-01T10:00:00Z"}`},
		{`a: "y"` + "\nb: !!str 10\nc: '012'", `{"a":"y","b":"10","c":"012"}`},
		{"x: &a {k: v}\ny: *a", `{"x":{"k":"v"},"y":{"k":"v"}}`},
		{"1: a\ntrue: b", `{"1":"a","true":"b"}`},
		{"s: <b>&</b>", `{"s":"<b>&</b>"}`},
		{`{"apiVersion": "v1", "kind": "Pod"}`, `{"apiVersion":"v1","kind":"Pod"}`},
		{"", "null"},
		{"# only a comment\n", "null"},
	} {
		got, err := ToJSON([]byte(tc.in))
		if err != nil || string(got) != tc.want {
			t.Errorf("ToJSON(%q) = %s, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestToJSONErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"a: 1\na: 2", "appears twice"},
		{"base: &b {x: 1}\nd:\n  <<: *b", "merge keys"},
		{"a: !!bool yes", "not a boolean"},
		{"a: [", "parsing YAML"},
		{"a: 1\n---\nb: 2", "more than one document"},
		{"a: !!int 99999999999999999999999", "out of range"},
		{"a: .inf", "not a number"},
		{"? [a, b]\n: c", "must be a scalar"},
	} {
		if _, err := ToJSON([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ToJSON(%q): error %v, want one containing %q", tc.in, err, tc.want)
		}
	}
}

// TestAliasBomb: a few lines of nested aliases must not expand into
// gigabytes.
func TestAliasBomb(t *testing.T) {
	doc := "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
	prev := "a"
	for i := range 12 {
		name := string(rune('b' + i))
		doc += name + ": &" + name + " [*" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + "]\n"
		prev = name
	}
	if _, err := ToJSON([]byte(doc)); err == nil || !strings.Contains(err.Error(), "too large") {
		t.Fatalf("alias bomb: %v", err)
	}
}

func FuzzToJSON(f *testing.F) {
	for _, s := range []string{"a: y", "x: &a {k: v}\ny: *a", "a: [1, 2.5, true, ~]", "{}"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ToJSON(b) // must not panic or hang
	})
}
