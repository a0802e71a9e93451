package hbone

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The data path's socket calls on its hot path (recvmmsg, recvfrom,
// sendto) go through syscall.RawSyscall, not syscall.Syscall. A raw call
// must never block, and these cannot: each passes MSG_DONTWAIT, so it
// returns EAGAIN instead of waiting whatever mode the socket is in
// (Go's net package opens every socket non-blocking anyway). sendto
// passes MSG_NOSIGNAL too: a peer that is gone is an EPIPE, not a signal.
//
// Why it matters: syscall.Syscall brackets the call with entersyscall
// and exitsyscall, so that the runtime can give the P to another thread
// if the call blocks, and entersyscall wakes the runtime's monitor
// thread (sysmon) whenever sysmon sleeps because every P was idle. A
// proxy at light load is idle between almost all of its events, so each
// event paid a futex wake, sysmon's 20 µs sleeps, its futex sleep and
// two context switches: measured in the bench at http-1000rps-16c, about
// 4 futex and 2.5 nanosleep calls per request over the two agents, next
// to about 7 socket calls. A raw call does not touch the scheduler.

// sysRead reads what the socket holds now into p: 0 at EOF, EAGAIN when
// it holds nothing.
func sysRead(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, e := syscall.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), nil
}

// sysWrite writes as much of p as the socket takes now (EAGAIN: nothing).
func sysWrite(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, e := syscall.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), nil
}

// sysRecvmmsg receives up to n messages into msgs without waiting.
func sysRecvmmsg(fd int, msgs unsafe.Pointer, n int) (int, syscall.Errno) {
	got, _, e := syscall.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(msgs), uintptr(n), unix.MSG_DONTWAIT, 0, 0)
	return int(got), e
}
