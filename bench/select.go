package bench

import (
	"fmt"
	"strings"
)

// notSelected is the reason given for scenarios left out with
// Options.Scenarios.
const notSelected = "not selected (--scenarios)"

// SelectScenarios turns a --scenarios list into the set of scenarios to
// run. Each entry is a scenario name or a letter a to e, for every
// scenario of that letter ("e": e-nodemesh-l7 and e-haproxy-http-sidecar).
// The baselines the chosen scenarios are measured against are added, and
// a-nomesh always is (every run needs it). An empty list selects all.
func SelectScenarios(list []string) (map[string]bool, error) {
	all := scenarios()
	sel := map[string]bool{}
	if len(list) == 0 {
		for _, sc := range all {
			sel[sc.Name] = true
		}
		return sel, nil
	}
	for _, e := range list {
		e = strings.TrimSpace(e)
		n := 0
		for _, sc := range all {
			if sc.Name == e || len(e) == 1 && strings.HasPrefix(sc.Name, e+"-") {
				sel[sc.Name] = true
				n++
			}
		}
		if n == 0 {
			names := make([]string, len(all))
			for i, sc := range all {
				names[i] = sc.Name
			}
			return nil, fmt.Errorf("unknown scenario %q: want a letter a-e or one of %s", e, strings.Join(names, ", "))
		}
	}
	for _, sc := range all {
		if sel[sc.Name] && sc.Baseline != "" {
			sel[sc.Baseline] = true
		}
	}
	sel[scenarioNoMesh] = true
	return sel, nil
}

// selected reports whether the run includes a scenario (all when no
// selection was made).
func (r *runner) selected(names ...string) bool {
	if r.sel == nil {
		return true
	}
	for _, n := range names {
		if r.sel[n] {
			return true
		}
	}
	return false
}
