package redirect

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// ProbeTransparentDelivery reports whether this kernel supports
// transparent inbound delivery (docs/capture.md): the sk_lookup program
// must read bpf_sk_lookup.ingress_ifindex (Linux 5.17) to let the agent's
// deliveries over a pod's loopback reach the application. It loads the
// capture's sk_lookup program with that check compiled in, as Load first
// tries, with private maps (nothing pinned or attached), and closes it
// again. nil means supported; an error wrapping ebpf.ErrNotSupported means
// the kernel refuses the program and Load falls back to delivering from
// the pod's own IP; any other error means the probe could not tell (no
// CAP_BPF, for one).
//
// Tests use it to expect what the agent does on the kernel they run on.
func ProbeTransparentDelivery() error {
	spec, err := loadCapture()
	if err != nil {
		return fmt.Errorf("probing transparent delivery: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	if err := spec.Variables[captureVarLookupIfindex].Set(uint32(1)); err != nil {
		return fmt.Errorf("probing transparent delivery: %w", err)
	}
	var objs struct {
		Prog *ebpf.Program `ebpf:"nm_sklookup"`
	}
	err = spec.LoadAndAssign(&objs, nil)
	var ve *ebpf.VerifierError
	switch {
	case errors.As(err, &ve):
		return fmt.Errorf("probing transparent delivery: the kernel's sk_lookup lacks ingress_ifindex (needs Linux 5.17+): %w", ebpf.ErrNotSupported)
	case err != nil:
		return fmt.Errorf("probing transparent delivery: %w", err)
	}
	return objs.Prog.Close()
}
