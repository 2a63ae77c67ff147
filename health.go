package spoe

import (
	"encoding/json"
	"net/http"
	"path"
)

// Ready reports whether the agent serves: true from the time Serve (or
// ListenAndServe, Run...) accepts on a listener, false once Shutdown or
// Close began, and before any listener is served.
func (a *Agent) Ready() bool {
	a.init()
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.listeners) > 0 && !a.shutdown.Load()
}

// HealthHandler returns an http.Handler for probes and stats, which
// answers by the last element of the request's path, so that it can be
// mounted under any prefix:
//
//	.../ready  200 "ready" while Ready is true, else 503 "not ready"
//	           (a readiness probe: take the agent out of service while it
//	           shuts down)
//	.../live   200 "ok" while the process answers (a liveness probe)
//	.../stats  200, Stats as JSON (durations in nanoseconds)
//
// and 404 for any other path. For instance:
//
//	mux := http.NewServeMux()
//	mux.Handle("/spoe/", http.StripPrefix("/spoe", agent.HealthHandler()))
//	go http.ListenAndServe("127.0.0.1:8080", mux)
func (a *Agent) HealthHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		switch path.Base(r.URL.Path) {
		case "ready":
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			if !a.Ready() {
				w.WriteHeader(http.StatusServiceUnavailable)
				_, _ = w.Write([]byte("not ready\n"))
				return
			}
			_, _ = w.Write([]byte("ready\n"))
		case "live":
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			_, _ = w.Write([]byte("ok\n"))
		case "stats":
			w.Header().Set("Content-Type", "application/json")
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			_ = enc.Encode(a.Stats())
		default:
			http.NotFound(w, r)
		}
	})
}
