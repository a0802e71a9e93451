package authz

import (
	"net/http"
)

// DeniedBody is the body of a 403, the text Istio's proxies send.
const DeniedBody = "RBAC: access denied\n"

// DecideFunc decides a prepared request: allow, and a reason for logs.
type DecideFunc func(r *Request) (allow bool, reason string)

// Handler returns an http.Handler that prepares each request (Prepare),
// answers 400 when Prepare refuses it, asks decide, and answers 403 or
// passes the normalised request on to next. A denied request does not end
// the connection: the server reads the next request on it as usual.
// uniqueHeaders are the header names policy conditions use.
func Handler(decide DecideFunc, uniqueHeaders []string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, err := Prepare(r, uniqueHeaders)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if ok, _ := decide(&req); !ok {
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(DeniedBody))
			return
		}
		next.ServeHTTP(w, r)
	})
}
