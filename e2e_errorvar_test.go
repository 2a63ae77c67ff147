package spoe_test

// Actions the library leaves out of an ACK are visible to HAProxy's rules
// through the error variable, so that a rule can fail closed.

import (
	"net/http"
	"strings"
	"testing"

	"github.com/spoe-go/spoe"
)

func TestE2EDroppedActionSetsErrorVar(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		// The seed API cannot size its answers: on /big it answers a value
		// over HAProxy's max-frame-size (tune.bufsize), on /bad-name a
		// variable HAProxy would drop; each time beside a good one.
		agent := startAgent(t, spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
			path, _ := messages[0].ArgString("path")
			actions := []spoe.Action{spoe.ActionSetVar{Name: "allowed", Scope: spoe.VarScopeTransaction, Value: true}}
			switch path {
			case "/big":
				actions = append(actions, spoe.ActionSetVar{Name: "blob", Scope: spoe.VarScopeTransaction, Value: strings.Repeat("x", 20000)})
			case "/bad-name":
				actions = append(actions, spoe.ActionSetVar{Name: "bad-name", Scope: spoe.VarScopeTransaction, Value: 1})
			}
			return actions, nil
		}))
		h := startHAProxy(t, hp, haproxySetup{
			AgentAddr:       agent.addr,
			AgentDirectives: "messages check",
			SpoeSections: `
spoe-message check
    args path=path
    event on-frontend-http-request
`,
			// Fail closed: allowed, and the answer complete.
			Frontend: `
http-request deny deny_status 403 unless { var(txn.e2e.allowed) -m bool } !{ var(txn.e2e.error) -m found }
`,
		})
		c := newClient(t, false)
		for _, step := range []struct {
			path   string
			status int
		}{
			{"/ok", http.StatusOK},
			{"/big", http.StatusForbidden},
			{"/bad-name", http.StatusForbidden},
			{"/ok", http.StatusOK},
		} {
			if res := get(t, c, h.url+step.path); res.status != step.status {
				t.Errorf("GET %s: status %d, want %d", step.path, res.status, step.status)
			}
		}
		if n := agent.Stats().ActionsRefused; n != 2 {
			t.Errorf("ActionsRefused = %d, want 2", n)
		}
	})
}
