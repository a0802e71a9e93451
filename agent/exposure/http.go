package exposure

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"
)

// Path is where the agent's admin API serves the report.
const Path = "/exposure"

// Handler serves the report: GET Path?window=10m&if-strict=NS&top=20.
func Handler(l *Ledger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			http.Error(w, "use GET", http.StatusMethodNotAllowed)
			return
		}
		q := r.URL.Query()
		var o ReportOptions
		if s := q.Get("window"); s != "" {
			d, err := time.ParseDuration(s)
			if err != nil || d <= 0 {
				http.Error(w, "window "+strconv.Quote(s)+": want a positive duration such as 10m", http.StatusBadRequest)
				return
			}
			o.Window = d
		}
		if s := q.Get("top"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 || n > 1000 {
				http.Error(w, "top "+strconv.Quote(s)+": want 1 to 1000", http.StatusBadRequest)
				return
			}
			o.Top = n
		}
		o.IfStrict = q.Get("if-strict")
		rep, err := l.Report(o)
		if errors.Is(err, ErrWindow) {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rep)
	})
}
