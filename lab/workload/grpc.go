package workload

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// GRPCPodHeader is the response header (gRPC metadata) in which the grpc
// workload names the pod that answered.
const GRPCPodHeader = "x-nodemesh-pod"

// runGRPC serves the standard gRPC health service (grpc.health.v1.Health)
// in plaintext HTTP/2 (h2c), as a gRPC service inside a mesh does; every
// answer carries the pod's name in GRPCPodHeader.
func runGRPC(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("grpc", flag.ContinueOnError)
	port := fs.Int("port", 9090, "port to serve gRPC on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	pod := podName()
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		_ = grpc.SetHeader(ctx, metadata.Pairs(GRPCPodHeader, pod))
		return h(ctx, req)
	}))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	ln, err := listen(ctx, "tcp4", *port)
	if err != nil {
		return err
	}
	log.Info("serving grpc", "port", *port)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		srv.GracefulStop()
		<-errc
		return nil
	case err := <-errc:
		return err
	}
}

// GRPCResult is one line the grpc-check workload prints.
type GRPCResult struct {
	Code    string `json:"code"`              // gRPC status code name, e.g. OK
	Message string `json:"message,omitempty"` // gRPC status message
	Status  string `json:"status,omitempty"`  // the health status, e.g. SERVING
	Pod     string `json:"pod,omitempty"`     // GRPCPodHeader of the answer
}

// runGRPCCheck calls grpc.health.v1.Health/Check n times on one
// connection to ADDR (h2c), printing a GRPCResult line per call.
func runGRPCCheck(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("grpc-check", flag.ContinueOnError)
	n := fs.Int("n", 1, "calls to make")
	service := fs.String("service", "", "the health service name to ask about")
	timeout := fs.Duration("timeout", 20*time.Second, "overall deadline")
	md := metadata.MD{}
	fs.Func("header", "request metadata, name=value (repeatable)", func(s string) error {
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			return errors.New("want name=value")
		}
		md.Append(k, v)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 || *n < 1 {
		return errors.New("usage: grpc-check [--n N] [--service S] [--header name=value] HOST:PORT")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	cc, err := grpc.NewClient("passthrough:///"+fs.Arg(0), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("creating a gRPC client for %s: %w", fs.Arg(0), err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	enc := json.NewEncoder(stdout)
	for range *n {
		var hdr metadata.MD
		resp, err := hc.Check(metadata.NewOutgoingContext(ctx, md), &healthpb.HealthCheckRequest{Service: *service}, grpc.Header(&hdr))
		st := status.Convert(err)
		res := GRPCResult{Code: st.Code().String(), Message: st.Message()}
		if resp != nil {
			res.Status = resp.GetStatus().String()
		}
		if v := hdr.Get(GRPCPodHeader); len(v) > 0 {
			res.Pod = v[0]
		}
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	return nil
}
