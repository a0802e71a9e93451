package main

import (
	"context"
	"os"
	"os/signal"

	"github.com/nodemesh/nodemesh/agent/policy/explain"
)

// runPolicy implements "nodemeshctl policy ..." (today: "policy explain
// --from-files DIR ..."); args are the arguments after "policy".
func runPolicy(args []string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	return explain.Run(ctx, args, os.Stdout, os.Stderr)
}
