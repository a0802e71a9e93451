// Package redirect captures the TCP traffic of enrolled pods with eBPF.
package redirect
