package ca

import (
	"encoding/base64"
	"slices"
	"testing"
)

func TestPeekClaims(t *testing.T) {
	enc := func(s string) string { return "e30." + base64.RawURLEncoding.EncodeToString([]byte(s)) + ".sig" }
	for _, tc := range []struct {
		tok string
		ok  bool
		exp int64
		aud []string
	}{
		{enc(`{"exp":1700000000,"aud":["nodemesh-ca","x"]}`), true, 1700000000, []string{"nodemesh-ca", "x"}},
		{enc(`{"exp":5,"aud":"nodemesh-ca"}`), true, 5, []string{"nodemesh-ca"}},
		{enc(`{}`), true, 0, nil},
		{enc(`[`), false, 0, nil},
		{"abc", false, 0, nil},
		{"a.!!!.c", false, 0, nil},
	} {
		c := peekClaims(tc.tok)
		if c.ok != tc.ok || c.exp != tc.exp || !slices.Equal(c.aud, tc.aud) {
			t.Errorf("peekClaims(%q) = %+v", tc.tok, c)
		}
	}
}

func FuzzPeekClaims(f *testing.F) {
	f.Add("e30.eyJleHAiOjEsImF1ZCI6WyJhIl19.x")
	f.Add("..")
	f.Add("a.b.c.d")
	f.Fuzz(func(t *testing.T, s string) {
		_ = peekClaims(s) // must not panic on any token
	})
}
