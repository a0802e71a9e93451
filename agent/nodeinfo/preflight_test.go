package nodeinfo

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func status(capEff uint64, nspid string) []byte {
	return []byte("Name:\tnodemesh-agent\nNSpid:\t" + nspid + "\nCapInh:\t0000000000000000\nCapEff:\t" +
		strings.TrimPrefix(strings.ToLower(hex16(capEff)), "0x") + "\n")
}

func hex16(v uint64) string {
	const digits = "0123456789abcdef"
	b := make([]byte, 16)
	for i := 15; i >= 0; i-- {
		b[i] = digits[v&0xf]
		v >>= 4
	}
	return string(b)
}

func caps(bits ...int) uint64 {
	var v uint64
	for _, b := range bits {
		v |= 1 << uint(b)
	}
	return v
}

func TestCheckCaps(t *testing.T) {
	agent := caps(unix.CAP_BPF, unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN, unix.CAP_SYS_PTRACE)
	tests := []struct {
		name    string
		eff     uint64
		ptrace  bool
		missing []string
	}{
		{"the DaemonSet's set", agent, true, nil},
		{"full root", ^uint64(0) >> 23, true, nil},
		{"pre-5.8 kernel: CAP_SYS_ADMIN stands in for CAP_BPF", caps(unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN), false, nil},
		{"no CAP_NET_ADMIN", caps(unix.CAP_BPF, unix.CAP_SYS_ADMIN, unix.CAP_SYS_PTRACE), true, []string{"CAP_NET_ADMIN"}},
		{"no CAP_SYS_PTRACE under hostPID discovery", caps(unix.CAP_BPF, unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN), true, []string{"CAP_SYS_PTRACE"}},
		{"CAP_SYS_PTRACE not needed without it", caps(unix.CAP_BPF, unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN), false, nil},
		{"nothing", 0, true, []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkCaps(status(tt.eff, "1234"), nil, tt.ptrace)
			if (err != nil) != (len(tt.missing) > 0) {
				t.Fatalf("checkCaps = %v, want missing %v", err, tt.missing)
			}
			for _, m := range tt.missing {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not name %s", err, m)
				}
			}
			if err != nil && !strings.Contains(err.Error(), "capabilities.add") {
				t.Errorf("error %q does not say how to fix it", err)
			}
		})
	}
	if err := checkCaps([]byte("Name:\tx\n"), nil, false); err == nil {
		t.Error("checkCaps without a CapEff line passed")
	}
	if err := checkCaps([]byte("CapEff:\tzz\n"), nil, false); err == nil {
		t.Error("checkCaps with a bad CapEff passed")
	}
}

func TestCheckHostPID(t *testing.T) {
	if err := checkHostPID(status(0, "4242"), nil); err != nil {
		t.Errorf("host PID namespace refused: %v", err)
	}
	err := checkHostPID(status(0, "4242\t1"), nil)
	if err == nil || !strings.Contains(err.Error(), "hostPID: true") {
		t.Errorf("nested PID namespace: %v, want an error telling to set hostPID", err)
	}
	if err := checkHostPID([]byte("Name:\tx\n"), nil); err == nil {
		t.Error("no NSpid line passed")
	}
}

func TestReportErr(t *testing.T) {
	r := Report{Results: []Result{{Name: "a"}, {Name: "b"}}}
	if err := r.Err(); err != nil {
		t.Errorf("all passed, Err = %v", err)
	}
	r.Results = append(r.Results, Result{Name: "kernel BTF", Err: errString("no BTF")}, Result{Name: "bpffs", Err: errString("not mounted")})
	err := r.Err()
	if err == nil || !strings.Contains(err.Error(), "kernel BTF: no BTF") || !strings.Contains(err.Error(), "bpffs: not mounted") {
		t.Errorf("Err = %v, want both failures", err)
	}
}

type errString string

func (e errString) Error() string { return string(e) }
