package main

import (
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDocumentedCommands checks every `nodemeshctl ...` command line in
// the docs and the README against the command tree: the command exists and
// each --flag it uses is one of its flags. lab and bench parse their own
// flags and are skipped past their name.
func TestDocumentedCommands(t *testing.T) {
	files, _ := filepath.Glob("../../docs/*.md")
	files = append(files, "../../README.md")
	// Command lines: at the start of a line (code blocks; also after "$ "
	// or "sudo ") or at the start of an inline code span.
	lineRE := regexp.MustCompile(`(?m)(?:^|^\$ |^sudo |` + "`" + `)nodemeshctl ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)*)([^` + "`" + `#\n]*)`)
	flagRE := regexp.MustCompile(`(?:^|[\s\[])(--[a-z][a-z-]*)`)
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range lineRE.FindAllStringSubmatch(string(b), -1) {
			root := newRoot(&globals{}, io.Discard)
			words := strings.Fields(m[1])
			if words[0] == "completion" {
				continue // cobra's own, added when the tree runs
			}
			cmd, rest, err := root.Find(words)
			if err != nil || cmd == root {
				t.Errorf("%s: `nodemeshctl %s`: no such command", filepath.Base(f), m[1])
				continue
			}
			if cmd.DisableFlagParsing || len(rest) > 0 && cmd.Name() != "completion" {
				continue // lab, bench: their own parsers; or arguments
			}
			n++
			for _, fm := range flagRE.FindAllStringSubmatch(m[2], -1) {
				name := strings.TrimPrefix(fm[1], "--")
				if cmd.Flags().Lookup(name) == nil && cmd.InheritedFlags().Lookup(name) == nil && name != "help" {
					t.Errorf("%s: `nodemeshctl %s%s`: no flag --%s", filepath.Base(f), m[1], m[2], name)
				}
			}
		}
	}
	if n < 10 {
		t.Errorf("found only %d documented cluster commands", n)
	}
}
