// Package flagdoc keeps a binary's flag table in the docs in step with its
// flag.FlagSet, for tests: the names both ways, the defaults, and the
// environment variables that change each default.
package flagdoc

import (
	"flag"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// row is one documented flag.
type row struct {
	env []string // environment variables, without $
	def string   // "" when documented as —
}

var tick = regexp.MustCompile("`([^`]*)`")

// read returns the table that follows the line starting with header in
// the Markdown file path. Its columns: flag, environment, default, what.
func read(t testing.TB, path, header string) map[string]row {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]row{}
	in := false
	for line := range strings.SplitSeq(string(b), "\n") {
		if strings.HasPrefix(line, header) {
			in = true
			continue
		}
		if !in || strings.HasPrefix(line, "|---") {
			continue
		}
		if !strings.HasPrefix(line, "|") {
			break
		}
		cells := strings.Split(line, "|")
		if len(cells) < 6 {
			t.Fatalf("%s: malformed flag row %q", path, line)
		}
		name := tick.FindStringSubmatch(cells[1])
		if name == nil || !strings.HasPrefix(name[1], "--") {
			t.Fatalf("%s: no `--flag` in %q", path, line)
		}
		var r row
		for _, m := range tick.FindAllStringSubmatch(cells[2], -1) {
			r.env = append(r.env, strings.TrimPrefix(m[1], "$"))
		}
		slices.Sort(r.env)
		if def := strings.TrimSpace(cells[3]); def != "—" {
			m := tick.FindStringSubmatch(def)
			if m == nil {
				t.Fatalf("%s: default of %s is neither — nor `value`: %q", path, name[1], def)
			}
			r.def = m[1]
		}
		out[strings.TrimPrefix(name[1], "--")] = r
	}
	if len(out) == 0 {
		t.Fatalf("%s has no table after %q", path, header)
	}
	return out
}

// Check reads the flag table after header in the Markdown file path
// against the flags newFlags defines, both ways: every flag is there,
// nothing else is, each default is the code's (with an empty
// environment), and each environment variable listed is one that changes
// that flag's default (found by setting each variable the code reads, one
// at a time).
func Check(t testing.TB, path, header string, newFlags func(getenv func(string) string) *flag.FlagSet) {
	t.Helper()
	doc := read(t, path, header)
	defaults := map[string]string{}
	newFlags(func(string) string { return "" }).VisitAll(func(f *flag.Flag) { defaults[f.Name] = f.DefValue })

	var keys []string
	newFlags(func(k string) string { keys = append(keys, k); return "" })
	envOf := map[string][]string{}
	for _, k := range slices.Compact(slices.Sorted(slices.Values(keys))) {
		newFlags(func(key string) string {
			if key == k {
				return "7"
			}
			return ""
		}).VisitAll(func(f *flag.Flag) {
			if f.DefValue != defaults[f.Name] {
				envOf[f.Name] = append(envOf[f.Name], k)
			}
		})
	}
	for name, def := range defaults {
		r, ok := doc[name]
		if !ok {
			t.Errorf("--%s is not in %s's flag table", name, path)
			continue
		}
		if r.def != def {
			t.Errorf("--%s: %s says default %q, the code %q", name, path, r.def, def)
		}
		slices.Sort(envOf[name])
		if !slices.Equal(r.env, envOf[name]) {
			t.Errorf("--%s: %s lists environment %q, the code reads %q", name, path, r.env, envOf[name])
		}
	}
	for name := range doc {
		if _, ok := defaults[name]; !ok {
			t.Errorf("%s documents --%s, which the binary does not have", path, name)
		}
	}
}
