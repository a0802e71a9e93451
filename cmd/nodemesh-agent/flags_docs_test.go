package main

import (
	"flag"
	"testing"

	"github.com/nodemesh/nodemesh/cmd/internal/flagdoc"
)

// TestDocumentedFlags reads docs/install.md's table of agent flags against
// the agent's flag set (names both ways, defaults, environment variables).
func TestDocumentedFlags(t *testing.T) {
	flagdoc.Check(t, "../../docs/install.md", "| flag | environment | default |", func(getenv func(string) string) *flag.FlagSet {
		return flags(&Config{}, getenv)
	})
}
