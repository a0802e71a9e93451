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
