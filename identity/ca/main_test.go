package ca_test

import (
	"testing"

	"github.com/nodemesh/nodemesh/identity/identitytest"
)

func TestMain(m *testing.M) { identitytest.Main(m) }
