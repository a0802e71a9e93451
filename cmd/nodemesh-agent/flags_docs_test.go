package main

import (
	"flag"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// docFlag is one row of docs/install.md's table of agent flags.
type docFlag struct {
	env []string // environment variables, without $
	def string   // "" for —
}

func documentedFlags(t *testing.T) map[string]docFlag {
	t.Helper()
	b, err := os.ReadFile("../../docs/install.md")
	if err != nil {
		t.Fatal(err)
	}
	tick := regexp.MustCompile("`([^`]*)`")
	out := map[string]docFlag{}
	in := false
	for line := range strings.SplitSeq(string(b), "\n") {
		if strings.HasPrefix(line, "| flag | environment | default |") {
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
			t.Fatalf("docs/install.md: malformed flag row %q", line)
		}
		name := tick.FindStringSubmatch(cells[1])
		if name == nil || !strings.HasPrefix(name[1], "--") {
			t.Fatalf("docs/install.md: no `--flag` in %q", line)
		}
		var d docFlag
		for _, m := range tick.FindAllStringSubmatch(cells[2], -1) {
			d.env = append(d.env, strings.TrimPrefix(m[1], "$"))
		}
		slices.Sort(d.env)
		if def := strings.TrimSpace(cells[3]); def != "—" {
			m := tick.FindStringSubmatch(def)
			if m == nil {
				t.Fatalf("docs/install.md: default of %s is neither — nor `value`: %q", name[1], def)
			}
			d.def = m[1]
		}
		out[strings.TrimPrefix(name[1], "--")] = d
	}
	if len(out) == 0 {
		t.Fatal("docs/install.md has no agent flag table")
	}
	return out
}

// TestDocumentedFlags reads docs/install.md's table of agent flags
// against the flags the agent defines, both ways: every flag is there,
// nothing else is, each default is the code's, and each environment
// variable listed is one that changes that flag's default (found by
// setting each variable the code reads, one at a time).
func TestDocumentedFlags(t *testing.T) {
	doc := documentedFlags(t)
	noEnv := func(string) string { return "" }
	defaults := map[string]string{}
	flags(&Config{}, noEnv).VisitAll(func(f *flag.Flag) { defaults[f.Name] = f.DefValue })

	// The variables the code reads, and the flags each one moves.
	var keys []string
	flags(&Config{}, func(k string) string { keys = append(keys, k); return "" })
	envOf := map[string][]string{}
	for _, k := range slices.Compact(slices.Sorted(slices.Values(keys))) {
		flags(&Config{}, func(key string) string {
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
		d, ok := doc[name]
		if !ok {
			t.Errorf("--%s is not in docs/install.md's flag table", name)
			continue
		}
		if d.def != def {
			t.Errorf("--%s: docs/install.md says default %q, the code %q", name, d.def, def)
		}
		slices.Sort(envOf[name])
		if !slices.Equal(d.env, envOf[name]) {
			t.Errorf("--%s: docs/install.md lists environment %q, the code reads %q", name, d.env, envOf[name])
		}
	}
	for name := range doc {
		if _, ok := defaults[name]; !ok {
			t.Errorf("docs/install.md documents --%s, which the agent does not have", name)
		}
	}
}
