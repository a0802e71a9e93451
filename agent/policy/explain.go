package policy

import (
	"fmt"
	"strings"
)

// Text renders a decision for people: verdict, flow, the deciding direction,
// policy and rule, the reason, and every check in evaluation order.
func (d *Decision) Text() string {
	var b strings.Builder
	auth := "plaintext"
	if d.Principal != "" {
		auth = "mTLS as " + d.Principal
	}
	fmt.Fprintf(&b, "%s  %s -> %s port %d/%s (%s)\n", d.Verdict, orDash(d.Src), orDash(d.Dst), d.Port, d.Protocol, auth)
	if r := d.Request; r != nil {
		fmt.Fprintf(&b, "request: %s %s", r.Method, r.Path)
		if r.Normalized != "" && r.Normalized != r.Path {
			fmt.Fprintf(&b, " (normalised: %s)", r.Normalized)
		}
		if r.Host != "" {
			fmt.Fprintf(&b, " host %s", r.Host)
		}
		if r.L7 {
			b.WriteString(", handled at L7")
		} else {
			b.WriteString(", not handled at L7")
		}
		switch {
		case r.Status != 0:
			fmt.Fprintf(&b, ": the destination agent answers %d", r.Status)
		case d.Verdict == Allow:
			b.WriteString(": forwarded to the application")
		}
		b.WriteString("\n")
		if r.Note != "" {
			fmt.Fprintf(&b, "note: %s\n", r.Note)
		}
	}
	fmt.Fprintf(&b, "decided by: %s", d.Direction)
	if d.Policy.IsZero() {
		b.WriteString(", no policy (default)")
	} else {
		fmt.Fprintf(&b, ", %s", d.Policy)
		if d.Rule >= 0 {
			fmt.Fprintf(&b, " rule %d", d.Rule)
		} else {
			b.WriteString(" (no rule)")
		}
	}
	fmt.Fprintf(&b, "\nreason: %s\n", d.Reason)
	for _, a := range d.Audit {
		fmt.Fprintf(&b, "audit: %s matched\n", a)
	}
	b.WriteString("checks:\n")
	for i, s := range d.Steps {
		fmt.Fprintf(&b, "  %d. %-7s %-19s %-5s %s\n", i+1, s.Direction, s.Check, s.Verdict, s.Reason)
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
