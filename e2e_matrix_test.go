package spoe_test

// End-to-end checks of what differs between HAProxy versions (issue 8):
// each runs on every HAProxy of the matrix (forEachHAProxy).

import (
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

// TestE2EEmptyAnswer: a handler that sets nothing. HAProxy 3.1.0 never
// hands an ACK with an empty payload to its SPOE applet (the event then
// waits for "timeout processing" and fails); the agent sends one NOOP
// action byte instead, which every version takes for "no actions". The
// answer must reach HAProxy at once: well before "timeout processing" (3s).
func TestE2EEmptyAnswer(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		agent := startAgent(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
			return nil
		})})
		h := startHAProxy(t, hp, haproxySetup{
			AgentAddr:       agent.addr,
			AgentDirectives: "messages empty",
			SpoeSections: `
spoe-message empty
    args src
    event on-frontend-http-request
`,
			Frontend: "http-request set-var(txn.e2e.before) str(kept)\n" +
				"http-after-response set-header x-before %[var(txn.e2e.before)] if { var(txn.e2e.before) -m found }\n" +
				"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }",
		})
		c := newClient(t, true)
		for i := 0; i < 5; i++ {
			start := time.Now()
			r := get(t, c, h.url+"/empty")
			took := time.Since(start)
			expectNoHeader(t, r, "x-spoe-error")
			expectHeader(t, r, "x-before", "kept")
			if took > 2*time.Second { // "timeout processing" is 3s; a loaded machine may take 1s
				t.Errorf("request %d took %v: the empty answer did not reach HAProxy at once", i, took)
			}
		}
		s := agent.Stats()
		t.Logf("HAProxy %s: 5 requests on %d agent connections", hp.version, s.ConnsTotal)
		if s.FramesOut.ACK != 5 {
			t.Errorf("agent wrote %d ACKs, want 5", s.FramesOut.ACK)
		}
	})
}
