package main

import (
	"flag"
	"testing"

	"github.com/nodemesh/nodemesh/cmd/internal/flagdoc"
)

// TestDocumentedFlags reads docs/install.md's table of CA flags against
// the CA's flag set (names both ways, defaults, environment variables).
func TestDocumentedFlags(t *testing.T) {
	flagdoc.Check(t, "../../docs/install.md", "| CA flag | environment | default |", func(getenv func(string) string) *flag.FlagSet {
		var dns string
		return flags(&Config{}, &dns, getenv)
	})
}
