package l7

import "bytes"

// H2Preface is the HTTP/2 client connection preface (RFC 9113 section 3.4).
const H2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// MaxSniff is the most bytes Sniff looks at: an HTTP/1.x request line
// longer than this is not recognised, and the connection stays at L4.
const MaxSniff = 8 << 10

// maxMethod bounds the method token of a recognised request line.
const maxMethod = 16

// Sniff decides from the first bytes a client sent whether a connection is
// HTTP/1.x, HTTP/2 with prior knowledge, or something else. It returns
// more=true when prefix is too short to tell: the caller reads more (up to
// MaxSniff bytes or a deadline) and calls Sniff again with everything it
// has, final=true once nothing more will come. A TCP verdict with more=false
// is final: the bytes are not HTTP, or not recognisably so.
//
// HTTP/1.x is recognised only by a whole request line: a method of 1 to 16
// upper-case letters, one space, a request target of visible characters, one
// space, "HTTP/1.0" or "HTTP/1.1", and the line end. So a protocol that
// merely starts with "GET " is not parsed by mistake, and a binary protocol
// is rejected at its first byte that cannot start a request line.
func Sniff(prefix []byte, final bool) (p Protocol, more bool) {
	n := min(len(prefix), len(H2Preface))
	if n > 0 && string(prefix[:n]) == H2Preface[:n] {
		if n == len(H2Preface) {
			return H2C, false
		}
		return TCP, !final
	}
	if nl := bytes.IndexByte(prefix, '\n'); nl >= 0 && nl < MaxSniff {
		if scanRequestLine(prefix[:nl], true) == lineValid {
			return HTTP1, false
		}
		return TCP, false
	}
	if final || len(prefix) >= MaxSniff || scanRequestLine(prefix, false) == lineInvalid {
		return TCP, false
	}
	return TCP, true
}

type lineState uint8

const (
	lineInvalid lineState = iota
	lineIncomplete
	lineValid
)

// scanRequestLine checks line (without its '\n') against the request-line
// shape Sniff accepts. With complete=false, line is a prefix of a line, and
// the answer is lineIncomplete while it can still become valid.
func scanRequestLine(line []byte, complete bool) lineState {
	incomplete := func() lineState {
		if complete {
			return lineInvalid
		}
		return lineIncomplete
	}
	i := 0
	for i < len(line) && line[i] >= 'A' && line[i] <= 'Z' {
		i++
	}
	if i > maxMethod {
		return lineInvalid
	}
	if i == len(line) {
		return incomplete()
	}
	if i == 0 || line[i] != ' ' {
		return lineInvalid
	}
	j := i + 1
	for j < len(line) && line[j] > ' ' && line[j] < 0x7f {
		j++
	}
	if j == len(line) {
		return incomplete()
	}
	if j == i+1 || line[j] != ' ' {
		return lineInvalid
	}
	rest := line[j+1:]
	if complete {
		rest = bytes.TrimSuffix(rest, []byte("\r"))
		if string(rest) == "HTTP/1.1" || string(rest) == "HTTP/1.0" {
			return lineValid
		}
		return lineInvalid
	}
	// A prefix of "HTTP/1.0\r" or "HTTP/1.1\r".
	for _, v := range []string{"HTTP/1.1\r", "HTTP/1.0\r"} {
		if len(rest) <= len(v) && string(rest) == v[:len(rest)] {
			return lineIncomplete
		}
	}
	return lineInvalid
}
