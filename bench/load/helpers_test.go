package load

import (
	"context"
	"net"
	"sync"
	"testing"
)

type dialer struct{}

func (dialer) DialContext(ctx context.Context, n, a string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, n, a)
}

func startServerB(b *testing.B) (string, string, string) {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{Size: 1024}
	if err := s.Listen(ctx, "127.0.0.1", 0, 0, 0); err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = s.Serve(ctx) }()
	b.Cleanup(func() { cancel(); wg.Wait() })
	return s.Addrs()
}
