package cni

import (
	"testing"

	"github.com/nodemesh/nodemesh/agent/internal/leaktest"
)

// TestMain checks that the tests leave no goroutine and no descriptor
// behind: the server owns sockets and the namespace descriptors it is sent.
func TestMain(m *testing.M) { leaktest.Main(m) }
